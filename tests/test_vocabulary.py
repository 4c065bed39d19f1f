"""The OSM vocabulary: iD-style tag matching, term mentions, and the builder of the committed file."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest

from demo import build_vocabulary as bv
from retriever.vocabulary import (
    DEFAULT_PATH,
    Mention,
    Vocabulary,
    VocabularyError,
    fold,
    valid_in_region,
)

FIXTURES = Path(__file__).parent / "data" / "vocabulary"


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.load()


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fixture_inputs() -> tuple[dict, dict[str, dict], dict]:
    translations = {lang: _fixture(f"{lang}.json") for lang in ("en", "fi", "sv")}
    return _fixture("presets.json"), translations, _fixture("nsi.json")


@pytest.fixture(scope="module")
def fixture_doc(fixture_inputs) -> dict:
    presets, translations, nsi = fixture_inputs
    return bv.derive_vocabulary(presets, translations, nsi)


def ids(mentions: list[Mention]) -> list[tuple[str, ...]]:
    return [m.preset_ids for m in mentions]


# --- match: hand-made tag sets against the committed vocabulary ---------------------------------------------


def test_cathedral_is_a_christian_place_of_worship(vocab: Vocabulary) -> None:
    tags = {"amenity": "place_of_worship", "religion": "christian", "building": "cathedral"}
    preset = vocab.match(tags)
    assert preset is not None and preset.id == "amenity/place_of_worship/christian"
    assert "cathedral" in preset.terms["en"]
    assert "cathedral" in vocab.words(preset)
    # Two exact tags (2.0) beat building/cathedral (0.5) and building=* (0.6 / 2).
    assert preset.score(tags) == 2.0 > vocab["building/cathedral"].score(tags)


def test_ferry_terminal(vocab: Vocabulary) -> None:
    preset = vocab.match({"amenity": "ferry_terminal"})
    assert preset is not None and preset.id == "amenity/ferry_terminal"
    assert not preset.searchable  # kept although iD hides it from search: iD matches with it
    assert {"ferry", "pier"} <= set(preset.terms["en"])
    assert preset.score({"amenity": "ferry_terminal"}) == pytest.approx(0.95 * 0.999)
    fi_words = vocab.words(preset, languages=("fi",))
    assert fi_words[0] == "lauttaterminaali"


def test_supermarket_with_a_brand(vocab: Vocabulary) -> None:
    preset = vocab.match({"shop": "supermarket", "brand": "S-market", "name": "S-market"})
    assert preset is not None and preset.id == "shop/supermarket"
    assert vocab.brand("S-market") == ("shop/supermarket",)
    assert vocab.brand("  s-MARKET ") == ("shop/supermarket",)  # folded like terms
    assert vocab.brand("Stockmann") == ("shop/department_store",)
    assert vocab.brand("no such brand anywhere") == ()


def test_railway_station(vocab: Vocabulary) -> None:
    assert vocab.match({"railway": "station", "name": "Helsinki"}).id == "railway/station"
    # addTags boost: public_transport=station + train=yes + railway=station scores 3 for station_train.
    full = {"railway": "station", "public_transport": "station", "train": "yes"}
    assert vocab.match(full).id == "public_transport/station_train"
    assert "railway station" in vocab.words(vocab.match(full))


def test_department_store(vocab: Vocabulary) -> None:
    preset = vocab.match({"shop": "department_store", "name": "Stockmann"})
    assert preset is not None and preset.id == "shop/department_store"
    assert preset.name() == "department store"
    assert preset.name("fi") == "tavaratalo" and preset.name("sv") == "varuhus"


def test_unknown_tags_give_none_and_generic_keys_fall_back(vocab: Vocabulary) -> None:
    assert vocab.match({"foo": "bar"}) is None  # no geometry fallback: it names no kind of place
    assert vocab.match({}) is None
    assert vocab.match({"amenity": "no_such_amenity"}).id == "amenity"  # amenity=* , as in iD
    assert vocab.match({"addr:street": "Mannerheimintie", "addr:housenumber": "1"}).id == "address"


def test_geometry_restricts_the_candidates(vocab: Vocabulary) -> None:
    assert vocab.match({"building": "cathedral"}, "area").id == "building/cathedral"
    assert vocab.match({"building": "cathedral"}, "point").id == "building_point"  # cathedral is area-only
    assert vocab.match({"amenity": "marketplace"}, "line").id == "amenity"
    with pytest.raises(VocabularyError, match="geometry"):
        vocab.match({"building": "yes"}, "polygon")


def test_location_sets_follow_the_region(vocab: Vocabulary) -> None:
    # Same tags, one preset for US/Canada only: in Finland the global one matches.
    assert vocab.match({"highway": "motorway_link"}).id == "highway/motorway_link"
    us_only = vocab["highway/motorway_link-US-CA"].location_set
    assert not valid_in_region(us_only, "fi") and valid_in_region(us_only, "us")
    assert valid_in_region({"include": ["150"]}, "fi") and not valid_in_region({"exclude": ["fi"]}, "fi")


def test_match_is_deterministic(vocab: Vocabulary) -> None:
    for tags in (
        {"amenity": "place_of_worship", "religion": "christian"},
        {"shop": "yes"},
        {"tourism": "hotel"},
    ):
        assert vocab.match(tags) == vocab.match(dict(reversed(list(tags.items()))))
        assert vocab.match(tags) is vocab.match(tags)


# --- mentions ----------------------------------------------------------------------------------------------


def test_cathedral_on_a_square(vocab: Vocabulary) -> None:
    text = "a big white cathedral on a square"
    found = vocab.mentions(text)
    assert [m.surface for m in found] == ["cathedral", "square"]  # "big", "white", "on" are not kinds
    assert found[0].preset_ids[0] == "amenity/place_of_worship/christian"
    assert "place/square" in found[1].preset_ids
    assert text[slice(*found[0].span)] == "cathedral"


def test_market_hall_by_the_harbour(vocab: Vocabulary) -> None:
    found = vocab.mentions("the market hall by the harbour")
    assert [m.surface for m in found] == ["market hall", "harbour"]  # one multi-word term, not "market"
    assert "amenity/marketplace" in found[0].preset_ids
    assert found[1].preset_ids[0] == "landuse/harbour"


def test_longest_match_wins_and_nothing_overlaps(vocab: Vocabulary) -> None:
    found = vocab.mentions("The railway station with the clock tower and a department store")
    assert [m.term for m in found] == ["railway station", "clock tower", "department store"]
    assert "railway/station" in found[0].preset_ids
    spans = [m.span for m in found]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_punctuation_splits_multi_word_terms(vocab: Vocabulary) -> None:
    assert [m.term for m in vocab.mentions("market-hall")] == ["market hall"]
    assert [m.term for m in vocab.mentions("a market, hall")] != ["market hall"]


def test_accent_folding_through_finnish_and_swedish(vocab: Vocabulary) -> None:
    text = "Järnvägsstationen och Domkyrkan, sedan Rautatieasemalla"
    found = vocab.mentions(text)
    assert [m.surface for m in found] == ["Järnvägsstationen", "Domkyrkan", "Rautatieasemalla"]
    assert [m.term for m in found] == ["jarnvagsstation", "domkyrka", "rautatieasema"]
    assert all("railway/station" in m.preset_ids for m in (found[0], found[2]))
    assert "amenity/place_of_worship/christian" in found[1].preset_ids
    assert vocab.mentions("jarnvagsstation")[0].preset_ids == found[0].preset_ids  # typed without accents
    assert vocab.mentions("kauppahalli")[0].preset_ids == ("amenity/marketplace",)


def test_simple_english_plurals(vocab: Vocabulary) -> None:
    found = vocab.mentions("two cathedrals, three churches and the ferries")
    assert [m.term for m in found] == ["cathedral", "church", "ferry"]
    assert [m.surface for m in found] == ["cathedrals", "churches", "ferries"]
    assert "amenity/ferry_terminal" in found[2].preset_ids
    # Plural endings only apply to English terms: "domes" is not Swedish "dom" (cathedral).
    assert vocab.mentions("green domes") == []


def test_stop_words_and_short_terms_never_fire(vocab: Vocabulary) -> None:
    # "the" (sv: tea), "by" (sv: village), "is" (sv: ice), "old", "green", "light" are all preset terms.
    assert vocab.mentions("the old green light is by it, a") == []
    assert vocab.kinds_for_term("the") == ()
    assert vocab.kinds_for_term("by") == ()


def test_kinds_for_term(vocab: Vocabulary) -> None:
    assert vocab.kinds_for_term("Market Hall") == ("amenity/marketplace",)
    assert vocab.kinds_for_term("cathedrals")[0] == "amenity/place_of_worship/christian"
    assert "shop/department_store" in vocab.kinds_for_term("tavaratalo")
    assert vocab.kinds_for_term("zzz unknown words") == ()
    assert set(vocab.kinds_for_term("railway station", languages=("en",))) >= {"railway/station"}
    assert vocab.kinds_for_term("rautatieasema", languages=("en",)) == ()


def test_mentions_are_deterministic(vocab: Vocabulary) -> None:
    text = "domed church near the harbour where the ferries leave"
    assert vocab.mentions(text) == vocab.mentions(text)
    assert vocab.mentions("") == []


def test_fold() -> None:
    assert fold("Järnvägsstationen") == "jarnvagsstationen"
    assert fold("Töölönlahti ÅÄÖ café") == "toolonlahti aao cafe"
    assert fold("Straße") == "strasse"
    assert fold("ﬁre") == "fire"
    assert fold("plain ascii") == "plain ascii"


def test_index_and_mentions_are_fast() -> None:
    # Generous bounds for a loaded 2-core CI machine; the measured figures are far lower (see the builder).
    started = time.perf_counter()
    vocab = Vocabulary.from_file(DEFAULT_PATH)
    vocab.mentions("warm up")  # builds the term index
    assert time.perf_counter() - started < 3.0
    text = " ".join(["the white cathedral above the market hall and the railway station by the harbour"] * 5)
    assert len(text.split()) >= 60
    best = min(_timed(vocab.mentions, text) for _ in range(5))
    assert best < 0.02


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def test_default_load_is_cached_and_a_missing_file_says_how_to_build() -> None:
    assert Vocabulary.load() is Vocabulary.load()
    with pytest.raises(VocabularyError, match="demo.build_vocabulary"):
        Vocabulary.load("/nonexistent/osm_vocabulary.json")


# --- derive_vocabulary on the hand-written fixture ----------------------------------------------------------


def test_derive_keeps_tagged_named_presets(fixture_doc: dict) -> None:
    presets = fixture_doc["presets"]
    # Templates, geometry fallbacks (point, area) and presets without any name are left out.
    assert "@templates/contact" not in presets and "point" not in presets and "area" not in presets
    assert "shop/nameless" not in presets
    assert {"amenity", "shop", "address", "railway/station"} <= set(presets)  # unsearchable ones stay
    assert list(presets) == sorted(presets)


def test_derive_entry_fields(fixture_doc: dict) -> None:
    presets = fixture_doc["presets"]
    ferry = presets["amenity/ferry_terminal"]
    assert ferry["tags"] == {"amenity": "ferry_terminal"}
    assert ferry["geometry"] == ["point", "vertex", "area"]
    assert ferry["matchScore"] == 0.95 and ferry["searchable"] is False
    assert ferry["name"] == {"en": "ferry terminal", "fi": "lauttaterminaali", "sv": "färjeterminal"}
    assert ferry["terms"]["fi"] == ["laiva", "lautta"]  # an old-style comma-joined string is split
    assert ferry["terms"]["sv"] == ["färja", "brygga", "pir"]
    # Lower-cased, deduplicated in order, blanks stripped; a term equal to the name is dropped.
    assert presets["amenity/place_of_worship"]["terms"]["en"] == ["church", "temple"]
    assert presets["shop/supermarket"]["terms"]["en"] == ["grocery", "market"]
    assert presets["amenity/marketplace"]["terms"]["fi"] == ["kauppapaikka"]
    assert presets["shop/department_store"]["aliases"] == {"en": ["big store"]}
    assert presets["shop/supermarket"]["name"] == {"en": "supermarket"}  # fi has terms but no name
    train = presets["public_transport/station_train"]
    assert train["addTags"]["railway"] == "station" and train["matchScore"] == 1
    assert "addTags" not in presets["address"]  # empty addTags carry nothing
    assert presets["highway/motorway_link-US-CA"]["locationSet"] == {"include": ["ca", "us"]}


def test_derive_supplement_is_kept_apart(fixture_doc: dict) -> None:
    market = fixture_doc["presets"]["amenity/marketplace"]
    assert market["supplement"]["en"][0] == "market hall" and "kauppahalli" in market["supplement"]["fi"]
    assert "market hall" not in market["terms"]["en"]
    christian = fixture_doc["presets"]["amenity/place_of_worship/christian"]
    assert "cathedral" in christian["supplement"]["en"]  # repeats an iD term to rank this preset first
    custom = bv.derive_presets(*_fixture_args(), supplement={"shop": {"en": ("Kiosk Row",)}})
    assert custom["shop"]["supplement"] == {"en": ["kiosk row"]}
    assert "supplement" not in custom["amenity/marketplace"]


def _fixture_args() -> tuple[dict, dict]:
    translations = {lang: _fixture(f"{lang}.json") for lang in ("en", "fi", "sv")}
    return _fixture("presets.json"), translations


def test_derive_brands(fixture_doc: dict) -> None:
    # Finland, Europe ("150") and the world count; a brand that excludes fi, totems, operators do not.
    assert fixture_doc["brands"] == {
        "Lidl": ["shop/supermarket"],
        "S-market": ["shop/supermarket"],
        "Stockmann": ["shop/department_store"],
    }
    assert fixture_doc["meta"]["brands"] == 3


def test_fixture_vocabulary_matches_and_mentions(fixture_doc: dict) -> None:
    vocab = Vocabulary.from_dict(fixture_doc)
    cathedral = {"amenity": "place_of_worship", "religion": "christian", "building": "cathedral"}
    assert vocab.match(cathedral).id == "amenity/place_of_worship/christian"
    assert vocab.match({"highway": "motorway_link"}).id == "highway/motorway_link"
    us = Vocabulary.from_dict(fixture_doc, region="us")
    assert us.match({"highway": "motorway_link"}).id == "highway/motorway_link-US-CA"
    assert [m.term for m in vocab.mentions("Lutheran cathedrals by the Färjeterminalen")] == [
        "lutheran",
        "cathedral",
        "farjeterminal",
    ]
    assert vocab.brand("lidl") == ("shop/supermarket",)


def test_derive_is_deterministic(fixture_inputs) -> None:
    presets, translations, nsi = fixture_inputs
    first = bv.dumps(bv.derive_vocabulary(presets, translations, nsi))
    shuffled = dict(reversed(list(presets.items())))  # input order must not matter
    assert bv.dumps(bv.derive_vocabulary(shuffled, translations, nsi)) == first
    assert json.loads(first)["meta"]["derivation_version"] == bv.DERIVATION_VERSION


# --- the builder: tarballs, CLI, atomic output --------------------------------------------------------------


def _tarball(path: Path, files: dict[str, object]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def fixture_tarballs(tmp_path: Path) -> tuple[Path, Path]:
    presets, translations = _fixture_args()
    schema = _tarball(
        tmp_path / bv.tarball_name(bv.SCHEMA_PACKAGE, "0.0.1"),
        {
            "package/package.json": {"name": bv.SCHEMA_PACKAGE, "version": "0.0.1", "license": "ISC"},
            bv.SCHEMA_FILES["presets"]: presets,
            **{bv.SCHEMA_FILES[lang]: translations[lang] for lang in ("en", "fi", "sv")},
        },
    )
    nsi = _tarball(
        tmp_path / bv.tarball_name(bv.NSI_PACKAGE, "0.0.2"),
        {
            "package/package.json": {"name": bv.NSI_PACKAGE, "version": "0.0.2", "license": "BSD-3-Clause"},
            bv.NSI_FILE: _fixture("nsi.json"),
        },
    )
    return schema, nsi


def test_build_from_tarballs_and_cli(fixture_tarballs, tmp_path: Path, monkeypatch, capsys) -> None:
    schema, nsi = fixture_tarballs
    doc = bv.build_document(schema, nsi)
    source = doc["meta"]["sources"][0]
    assert source["package"] == bv.SCHEMA_PACKAGE and source["version"] == "0.0.1"
    assert source["sha256"] == bv.sha256(schema) and source["license"] == "ISC"

    def no_npm(*args, **kwargs):
        raise AssertionError("a cached tarball must be reused, not fetched")

    monkeypatch.setattr(bv.subprocess, "run", no_npm)
    out = tmp_path / "out" / "vocab.json"
    argv = ["--version", "0.0.1", "--nsi-version", "0.0.2", "--cache", str(tmp_path), "--out", str(out)]
    assert bv.main(argv) == 0
    first = out.read_bytes()
    assert bv.main(argv) == 0
    assert out.read_bytes() == first  # byte-identical
    assert json.loads(first) == json.loads(bv.dumps(doc))
    assert [p.name for p in out.parent.iterdir()] == ["vocab.json"]  # no temp file left
    assert "presets" in capsys.readouterr().out


def test_pinned_sha256_mismatch_refetches(fixture_tarballs, tmp_path: Path, monkeypatch) -> None:
    schema, _ = fixture_tarballs
    good = schema.read_bytes()
    monkeypatch.setitem(bv.PINNED_SHA256, (bv.SCHEMA_PACKAGE, "0.0.1"), bv.sha256(schema))
    schema.write_bytes(b"corrupt")
    calls = []

    def fake_npm(cmd, **kwargs):
        calls.append(cmd)
        schema.write_bytes(good)
        return bv.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bv.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(bv.subprocess, "run", fake_npm)
    assert bv.fetch(bv.SCHEMA_PACKAGE, "0.0.1", tmp_path) == schema
    assert calls and calls[0][1:3] == ["pack", f"{bv.SCHEMA_PACKAGE}@0.0.1"]
    assert bv.fetch(bv.SCHEMA_PACKAGE, "0.0.1", tmp_path) == schema and len(calls) == 1  # now reused


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bv.shutil, "which", lambda name: None)
    assert (
        bv.main(["--version", "9.9.9", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "v.json")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: npm is not on PATH") and "Traceback" not in err
    bad = tmp_path / "cache" / bv.tarball_name(bv.SCHEMA_PACKAGE, "9.9.9")
    bad.write_bytes(b"not a tarball")  # unpinned version, cached: reused, then unreadable
    argv = [
        "--version",
        "9.9.9",
        "--no-brands",
        "--cache",
        str(bad.parent),
        "--out",
        str(tmp_path / "v.json"),
    ]
    assert bv.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: cannot read")


# --- the committed file ------------------------------------------------------------------------------------


def test_committed_file_records_its_sources() -> None:
    doc = json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))
    meta = doc["meta"]
    schema, nsi = meta["sources"]
    assert (schema["package"], schema["version"]) == (bv.SCHEMA_PACKAGE, bv.SCHEMA_VERSION)
    assert schema["sha256"] == bv.PINNED_SHA256[bv.SCHEMA_PACKAGE, bv.SCHEMA_VERSION]
    assert schema["license"] == "ISC" and nsi["license"] == "BSD-3-Clause"
    assert (nsi["package"], nsi["version"]) == (bv.NSI_PACKAGE, bv.NSI_VERSION)
    assert meta["derivation_version"] == bv.DERIVATION_VERSION
    assert DEFAULT_PATH.stat().st_size < 1.5 * 1024 * 1024
    assert (DEFAULT_PATH.parent / "OSM_VOCABULARY_ATTRIBUTION.md").is_file()


def test_committed_file_matches_the_builder() -> None:
    """Re-derive from the pinned npm tarballs (the Makefile fetches them) and compare byte for byte."""
    needed = [(bv.SCHEMA_PACKAGE, bv.SCHEMA_VERSION), (bv.NSI_PACKAGE, bv.NSI_VERSION)]
    paths = [bv.DEFAULT_CACHE / bv.tarball_name(package, version) for package, version in needed]
    missing = [bv.fetch_command(p, v) for (p, v), path in zip(needed, paths) if not path.is_file()]
    if missing:
        pytest.fail(
            "the pinned npm tarballs are not in .cache/npm; fetch them from the repository root with:\n  "
            + "\n  ".join(missing),
            pytrace=False,
        )
    for (package, version), path in zip(needed, paths):
        assert bv.sha256(path) == bv.PINNED_SHA256[package, version], f"{path} is not the pinned tarball"
    rebuilt = bv.dumps(bv.build_document(*paths))
    assert rebuilt == DEFAULT_PATH.read_text(encoding="utf-8"), (
        "retriever/data/osm_vocabulary.json is stale: run `python -m demo.build_vocabulary` and commit it"
    )
