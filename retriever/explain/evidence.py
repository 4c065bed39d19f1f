"""What a tile supports of a description: the query's mentions matched to the tile, its neighbours, or missed."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from retriever.vocabulary import STOPWORDS, Vocabulary, fold

Kind = Literal["name", "place", "street", "crossing", "water", "park", "square", "rail", "tram"]
Status = Literal["tile", "nearby", "miss"]

NEARBY_M = 100.0  # neighbours: tiles whose footprint lies within this many metres of the hit's
NAME_RATIO = 0.85  # difflib ratio for a typo-tolerant name match on folded tokens ("stokman" ~ "stockmann")
MIN_NAME_CHARS = 4  # shorter query tokens are never taken for names
NEARBY_WEIGHT = 0.5  # a nearby match counts half in the support share
M_PER_DEG_LAT = 111_320.0
PLACE_CACHE = 4096  # tiles (and neighbourhoods) whose parsed context is kept

_MARKUP = re.compile(r"<[^<>]{0,200}>|&#?\w{1,10};|\$\{[^}]{0,200}\}")  # HTML tags, entities, ${...}
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
STREET_SUFFIXES = (
    "katu", "tie", "kuja", "polku", "bulevardi", "esplanadi", "puistikko", "ranta", "gatan", "vagen",
    "gränd", "grand", "allen", "stigen", "kajen",
)  # fmt: skip
STREET_WORDS = frozenset({"street", "road", "avenue", "boulevard", "lane", "st", "rd", "ave"})
CROSSING_WORDS = frozenset({"corner", "crossing", "intersection", "meets", "junction", "kulma", "hörnet"})
# Words for the category kinds, and the tile categories that support them.
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "water": (
        "water", "sea", "harbour", "harbor", "bay", "lake", "shore", "waterfront", "canal", "river", "quay",
        "pier", "seaside", "meri", "satama", "vesi", "hamn", "vatten",
    ),
    "park": ("park", "parks", "garden", "gardens", "lawn", "lawns", "greenery", "puisto", "parken"),
    "square": ("square", "plaza", "tori", "torget", "aukio"),
    "rail": ("railway", "rail", "rails", "train", "trains", "tracks", "railyard", "metro", "subway"),
    "tram": ("tram", "trams", "tramline", "tramway", "streetcar", "ratikka", "raitiovaunu", "spårvagn"),
}  # fmt: skip
CATEGORY_TOKENS: dict[str, tuple[str, ...]] = {
    "water": ("water:", "places:water"),
    "park": ("green:park", "green:garden"),
    "square": ("squares:",),
    "rail": ("rail:rail", "rail:subway", "rail:platform", "landuse:railway"),
    "tram": ("rail:tram",),
}
_CATEGORY_OF_WORD = {fold(w): kind for kind, words in CATEGORY_WORDS.items() for w in words}
# Words a reason may always use: about the picture itself, or present in every tile of a city map.
GENERIC_WORDS = frozenset(
    """map tile tiles image picture photo view area place places description street streets road roads
    building buildings city centre center block blocks helsinki finland overhead satellite aerial""".split()
)


@dataclass(frozen=True)
class Feature:
    """One named feature of a tile's context: its names (fi / sv), its kind and its preset words."""

    names: tuple[str, ...]
    kind: str
    words: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.names[0]} ({self.kind})" if self.kind else self.names[0]


@dataclass(frozen=True)
class Mention:
    """Something the query names: where it is, as written, what sort of thing, and the presets it can mean."""

    surface: str
    span: tuple[int, int]
    kind: Kind
    preset_ids: tuple[str, ...] = ()
    key: str = ""  # the folded form matched on (a name, a term, "a & b" for a crossing)


@dataclass(frozen=True)
class Match:
    """A mention and where it was found: in the tile, in a neighbour within NEARBY_M, or nowhere."""

    mention: Mention
    status: Status
    matched: str = ""  # what it matched, as shown ("Stockmann (department store)", "park")


@dataclass(frozen=True)
class Evidence:
    """What the tile of one hit supports of one query."""

    query: str
    tile_id: str
    matches: tuple[Match, ...]
    tile_features: tuple[str, ...] = ()  # the tile's nearest named features, as labels
    allowed_names: frozenset[str] = field(default_factory=frozenset)  # folded name tokens of tile + nearby
    allowed_presets: frozenset[str] = field(default_factory=frozenset)  # preset ids present in tile + nearby
    allowed_words: frozenset[str] = field(default_factory=frozenset)  # folded kind words of tile + nearby

    @property
    def supported(self) -> list[Match]:
        return [m for m in self.matches if m.status == "tile"]

    @property
    def nearby(self) -> list[Match]:
        return [m for m in self.matches if m.status == "nearby"]

    @property
    def misses(self) -> list[Match]:
        return [m for m in self.matches if m.status == "miss"]

    @property
    def support_share(self) -> float:
        """(tile + NEARBY_WEIGHT x nearby) / mentions; 0 for a query that mentions nothing."""
        if not self.matches:
            return 0.0
        return (len(self.supported) + NEARBY_WEIGHT * len(self.nearby)) / len(self.matches)

    @property
    def name_share(self) -> float:
        """The support share of the query's names, streets and crossings alone; 0 when it names none."""
        named = [m for m in self.matches if m.mention.kind in ("name", "street", "crossing")]
        if not named:
            return 0.0
        found = sum(m.status == "tile" for m in named) + NEARBY_WEIGHT * sum(
            m.status == "nearby" for m in named
        )
        return found / len(named)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "tile_id": self.tile_id,
            "support_share": self.support_share,
            "matches": [
                {
                    "surface": m.mention.surface,
                    "kind": m.mention.kind,
                    "status": m.status,
                    "matched": m.matched,
                }
                for m in self.matches
            ],
        }


# -- tile context ----------------------------------------------------------------------------------------------


def _split_top(text: str, sep: str = ";") -> list[str]:
    """Split on `sep` outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_features(text: Any) -> list[Feature]:
    """Features from a context string "Name / Name_sv (kind; words, ...; looks); ..." (or a list of them)."""
    if text is None:
        return []
    if isinstance(text, list | tuple):
        return list(_parse_items(tuple(str(t) for t in text)))
    return list(_parse_context(str(text)))


@lru_cache(maxsize=4096)
def _parse_context(text: str) -> tuple[Feature, ...]:
    """parse_features of one context string, remembered: every search re-reads the same tiles' contexts."""
    return _parse_items(tuple(_split_top(text)))


def _parse_items(items: tuple[str, ...]) -> tuple[Feature, ...]:
    out = []
    for item in items:
        head, _, inner = item.partition("(")
        inner = inner.rsplit(")", 1)[0]
        names = tuple(n.strip() for n in head.split(" / ") if n.strip())
        pieces = [p.strip() for p in inner.split(";")] if inner else []
        kind = pieces[0] if pieces else ""
        words = tuple(w.strip() for p in pieces[1:] for w in p.split(",") if w.strip())
        if names:
            out.append(Feature(names, kind, words))
    return tuple(out)


def categories_of(context: Mapping[str, Any]) -> tuple[str, ...]:
    value = context.get("categories")
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in re.split(r"[;,\s]+", value) if v.strip())
    return tuple(str(v) for v in value)


def tile_features(context: Mapping[str, Any]) -> list[Feature]:
    """The tile's features from `context` when present (richer), else from `features`."""
    for column in ("context", "features"):
        if context.get(column):
            return parse_features(context[column])
    return []


def _has_category(categories: Iterable[str], kind: str) -> bool:
    return any(c.startswith(prefix) for c in categories for prefix in CATEGORY_TOKENS[kind])


def _name_tokens(name: str) -> list[str]:
    return [t for t in _WORD.findall(fold(name)) if len(t) >= MIN_NAME_CHARS and t not in STOPWORDS]


@dataclass
class _Place:
    """What one tile (or its neighbourhood) offers: features, categories, name tokens, presets, kind words."""

    features: list[Feature]
    categories: set[str]
    names: dict[str, list[Feature]]  # folded name token -> features with it
    presets: set[str]
    words: set[str]

    @classmethod
    def of(cls, contexts: Iterable[Mapping[str, Any]], vocabulary: Vocabulary) -> _Place:
        features: list[Feature] = []
        categories: set[str] = set()
        for context in contexts:
            features += tile_features(context)
            categories |= set(categories_of(context))
        names: dict[str, list[Feature]] = {}
        presets: set[str] = set()
        words: set[str] = set()
        for f in features:
            for n in f.names:
                for token in _name_tokens(n):
                    names.setdefault(token, []).append(f)
            for w in (f.kind, *f.words):
                if w:
                    words.add(fold(w))
            if f.kind:
                presets |= set(vocabulary.kinds_for_term(f.kind))
            presets |= set(_brand_presets(f, vocabulary))
        for kind in CATEGORY_TOKENS:
            if _has_category(categories, kind):
                words |= {fold(w) for w in CATEGORY_WORDS[kind]}
        return cls(features, categories, names, presets, words)


def _token_match(query_token: str, name_token: str) -> bool:
    """Equal, a typo away (difflib ratio), or a long query token inside a compound name ("esplanadi")."""
    if query_token == name_token:
        return True
    if len(query_token) >= 6 and query_token in name_token:
        return True
    if len(query_token) < 5 or query_token[0] != name_token[0]:
        return False
    return difflib.SequenceMatcher(None, query_token, name_token).ratio() >= NAME_RATIO


def _find_name(token: str, names: Mapping[str, list[Feature]]) -> Feature | None:
    """The feature whose name best matches a query token: exact before fuzzy, then the shortest name."""
    best: tuple[float, int] | None = None
    found = None
    for name_token, features in names.items():
        if not _token_match(token, name_token):
            continue
        ratio = 1.0 if token == name_token else difflib.SequenceMatcher(None, token, name_token).ratio()
        for f in features:
            score = (ratio, -len(_WORD.findall(f.names[0])))
            if best is None or score > best:
                best, found = score, f
    return found


# -- the finder ------------------------------------------------------------------------------------------------


class EvidenceFinder:
    """Matches query mentions against a tile, its neighbours within NEARBY_M and the whole gallery.

    tiles: the index's tile table (GeoDataFrame with tile_id, geometry and context columns), or None: then
    only the hit's own context is used (no "nearby", and names are recognised only in that context).
    """

    def __init__(self, tiles: Any = None, vocabulary: Vocabulary | None = None, nearby_m: float = NEARBY_M):
        self.vocabulary = vocabulary or Vocabulary.load()
        self.nearby_m = nearby_m
        self._contexts: dict[str, dict[str, Any]] = {}
        self._bounds: dict[str, tuple[float, float, float, float]] = {}
        if tiles is not None:
            columns = [c for c in ("features", "context", "categories") if c in tiles.columns]
            for i, tile_id in enumerate(tiles["tile_id"].astype(str)):
                self._contexts[tile_id] = {c: _plain(tiles[c].iloc[i]) for c in columns}
                self._bounds[tile_id] = tuple(float(v) for v in tiles.geometry.iloc[i].bounds)
        self._gallery = _Place.of(self._contexts.values(), self.vocabulary)
        self._neighbours: dict[str, list[str]] = {}
        self._places: dict[tuple[str, ...], _Place] = {}
        self._mentions: dict[str, list[Mention]] = {}

    @property
    def gallery_names(self) -> frozenset[str]:
        """Folded name tokens of every tile in the gallery."""
        return frozenset(self._gallery.names)

    def neighbours(self, tile_id: str) -> list[str]:
        """Tile ids whose bounding boxes lie within nearby_m of this tile's (itself left out)."""
        if tile_id in self._neighbours:
            return self._neighbours[tile_id]
        box = self._bounds.get(tile_id)
        out: list[str] = []
        if box is not None:
            west, south, east, north = box
            dlat = self.nearby_m / M_PER_DEG_LAT
            dlon = dlat / max(0.1, math.cos(math.radians((south + north) / 2)))
            for other, (w, s, e, n) in self._bounds.items():
                if (
                    other != tile_id
                    and w <= east + dlon
                    and e >= west - dlon
                    and s <= north + dlat
                    and n >= south - dlat
                ):
                    out.append(other)
        self._neighbours[tile_id] = out
        return out

    def mentions(self, query: str, names: Mapping[str, list[Feature]] | None = None) -> list[Mention]:
        """The query's names, streets, crossings, category words and kinds of place, in text order.

        A name is a query token that (typos allowed) names something in the gallery or in `names` (the hit's
        own tile), or a capitalised word after the first when there is no gallery to look in.
        """
        if self._gallery.names:  # the gallery holds every tile's names: one cached answer per query
            cached = self._mentions.get(query)
            if cached is None:
                if len(self._mentions) > PLACE_CACHE:
                    self._mentions.clear()
                cached = self._mentions[query] = self._find_mentions(query, self._gallery.names)
            return list(cached)
        return self._find_mentions(query, names or {})

    def _find_mentions(self, query: str, lookup: Mapping[str, list[Feature]]) -> list[Mention]:
        query = _MARKUP.sub(lambda m: " " * len(m.group()), query)  # "<img src=x ...>" names nothing
        words = [(m.group(), fold(m.group()), m.span()) for m in _WORD.finditer(query)]
        taken: set[int] = set()
        found: list[Mention] = []
        # 1. streets and names: tokens that look like a name here or anywhere in the gallery
        for i, (surface, token, span) in enumerate(words):
            if len(token) < MIN_NAME_CHARS or token in STOPWORDS or token in GENERIC_WORDS:
                continue
            is_street = token.endswith(STREET_SUFFIXES) and len(token) > 6
            if self.vocabulary.kinds_for_term(token) and not is_street:
                continue  # a kind word ("market", "hotel"), handled below
            if token in _CATEGORY_OF_WORD:
                continue
            feature = _find_name(token, lookup)
            capitalised = surface[:1].isupper() and i > 0
            if feature is None and not is_street and not (capitalised and not self._gallery.names):
                continue
            kind: Kind = "street" if is_street or (feature is not None and _is_street(feature)) else "name"
            if (
                found
                and found[-1].kind in ("name", "street")
                and found[-1].span[1] + 1 >= span[0]
                and feature is not None
                and found[-1].key == fold(feature.names[0])
            ):  # "Stock mann", "Hotel Torni" split over two tokens: one mention
                last = found.pop()
                span = (last.span[0], span[1])
                surface = query[span[0] : span[1]]
            found.append(Mention(surface, span, kind, key=fold(feature.names[0]) if feature else token))
            taken.add(i)
        # 2. a crossing: a crossing word and two streets
        streets = [m for m in found if m.kind == "street"]
        if len(streets) >= 2 and any(t in CROSSING_WORDS for _, t, _ in words):
            a, b = streets[:2]
            found.append(
                Mention(
                    f"{a.surface} & {b.surface}", (a.span[0], b.span[1]), "crossing", key=f"{a.key} & {b.key}"
                )
            )
        # 3. water, park, square, rail, tram
        for i, (surface, token, span) in enumerate(words):
            if i not in taken and token in _CATEGORY_OF_WORD:
                found.append(Mention(surface, span, _CATEGORY_OF_WORD[token], key=token))  # type: ignore[arg-type]
                taken.add(i)
        # 4. kinds of place through the vocabulary, where no word is already taken
        for m in self.vocabulary.mentions(query):
            covered = [j for j, w in enumerate(words) if w[2][0] < m.span[1] and w[2][1] > m.span[0]]
            if any(i in taken for i in covered) or m.term in GENERIC_WORDS:
                continue
            found.append(Mention(m.surface, m.span, "place", tuple(m.preset_ids), key=m.term))
            taken |= set(covered)
        found.sort(key=lambda m: m.span)
        # one mention per key
        unique: dict[tuple[str, str], Mention] = {}
        for m in found:
            unique.setdefault((m.kind, m.key), m)
        return list(unique.values())

    def evidence(self, query: str, hit: Any) -> Evidence:
        """Each mention of `query` matched against the hit's tile, then its neighbours, else a miss."""
        tile_id = str(getattr(hit, "tile_id", ""))
        own = dict(getattr(hit, "context", None) or {})
        if tile_id in self._contexts:
            own = {**self._contexts[tile_id], **{k: v for k, v in own.items() if v}}
        tile = self._place(("tile", tile_id, repr(sorted(own.items()))), [own])
        near = self._place(("near", tile_id), [self._contexts[t] for t in self.neighbours(tile_id)])
        matches = []
        for mention in self.mentions(query, tile.names):
            status: Status = "miss"
            matched = ""
            for place, where in ((tile, "tile"), (near, "nearby")):
                found = self._match(mention, place)
                if found is not None:
                    status, matched = where, found  # type: ignore[assignment]
                    break
            if status == "miss":
                matched = self._describe_miss(mention)
            matches.append(Match(mention, status, matched))
        return Evidence(
            query=query,
            tile_id=tile_id,
            matches=tuple(matches),
            tile_features=tuple(f.label for f in tile.features[:6]),
            allowed_names=frozenset(tile.names) | frozenset(near.names),
            allowed_presets=frozenset(tile.presets | near.presets),
            allowed_words=frozenset(tile.words | near.words),
        )

    def _place(self, key: tuple[str, ...], contexts: list[dict[str, Any]]) -> _Place:
        """_Place.of, remembered per tile (a search explains the same few tiles many times)."""
        place = self._places.get(key)
        if place is None:
            if len(self._places) > PLACE_CACHE:
                self._places.clear()
            place = self._places[key] = _Place.of(contexts, self.vocabulary)
        return place

    def _match(self, mention: Mention, place: _Place) -> str | None:
        """What in `place` the mention matches, as shown; None when nothing does."""
        if mention.kind in ("name", "street"):
            for token in _WORD.findall(fold(mention.surface)):
                if len(token) >= MIN_NAME_CHARS and (feature := _find_name(token, place.names)) is not None:
                    return feature.names[0] if mention.kind == "street" else feature.label
            return None
        if mention.kind == "crossing":
            a, b = mention.key.split(" & ")
            found = [_find_name(t, place.names) for t in (a.split()[0], b.split()[0])]
            return " & ".join(f.names[0] for f in found if f) if all(found) else None
        if mention.kind in CATEGORY_TOKENS:
            if _has_category(place.categories, mention.kind):
                return mention.kind
            return mention.surface.lower() if mention.key in place.words else None
        # a kind of place: a feature whose kind or preset words include the term, or one of its presets
        for f in place.features:
            if mention.key in (fold(f.kind), *(fold(w) for w in f.words)):
                return f.label
        if set(mention.preset_ids) & place.presets:
            for f in place.features:
                kinds = set(self.vocabulary.kinds_for_term(f.kind)) | set(_brand_presets(f, self.vocabulary))
                if kinds & set(mention.preset_ids):
                    return f.label
        return None

    def _describe_miss(self, mention: Mention) -> str:
        if mention.kind == "place" and mention.preset_ids and mention.preset_ids[0] in self.vocabulary:
            return self.vocabulary[mention.preset_ids[0]].name("en") or mention.surface
        return mention.surface


def _brand_presets(feature: Feature, vocabulary: Vocabulary) -> tuple[str, ...]:
    """What the name-suggestion-index says a feature's name is ("Stockmann" -> shop/department_store)."""
    return tuple(p for name in feature.names for p in vocabulary.brand(name))


def _is_street(feature: Feature) -> bool:
    kind = fold(feature.kind)
    return any(w in kind for w in ("street", "road", "path", "way")) or fold(feature.names[0]).endswith(
        STREET_SUFFIXES
    )


def _plain(value: Any) -> Any:
    """A context cell as str or list (numpy arrays from parquet become lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


# -- the reason from the evidence, and the faithfulness check ---------------------------------------------------

NEGATIONS = frozenset({"no", "not", "without", "lacks", "missing", "nor", "none", "isn't", "ei", "inga"})
_SENTENCE = re.compile(r"[^.!?]*[.!?]+")


def _join(items: Sequence[str], conjunction: str = "and") -> str:
    """ "a", "a and b", "a, b and c"."""
    items = list(dict.fromkeys(i for i in items if i))
    if len(items) < 2:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


def _shown(match: Match) -> str:
    """A matched mention as a reason names it: the feature for names, "cathedral (Tuomiokirkko)" for kinds."""
    kind, matched = match.mention.kind, match.matched
    if kind in ("name", "street", "crossing"):
        return matched
    if kind == "place":
        return f"{match.mention.surface.lower()} ({matched.split(' (')[0]})"
    return match.mention.surface.lower()


def plain_sentence(evidence: Evidence) -> str:
    """The evidence as one sentence: "Matches Stockmann (building) and Aleksanterinkatu; no theatre in this tile."

    Always says what does not match. Built from the evidence alone, so it is true by construction.
    """
    if not evidence.matches:
        shows = f" It shows {_join(list(evidence.tile_features[:3]))}." if evidence.tile_features else ""
        return (
            "Nothing in the description names a place or kind of place that the map data can check." + shows
        )
    parts = []
    if evidence.supported:
        parts.append("Matches " + _join([_shown(m) for m in evidence.supported]))
    if evidence.nearby:
        parts.append(_join([_shown(m) for m in evidence.nearby]) + " nearby (within 100 m)")
    if evidence.misses:
        parts.append(
            "no " + _join([m.mention.surface.lower() for m in evidence.misses], "or") + " in this tile"
        )
    else:
        parts.append("everything the description names is here or nearby")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


@dataclass(frozen=True)
class CheckedReason:
    """An LM-written text split into sentences, those kept (every name and kind supported) and those dropped."""

    sentences: tuple[str, ...]  # the complete sentences the LM wrote
    kept: tuple[str, ...]
    dropped: tuple[tuple[str, tuple[str, ...]], ...]  # (sentence, its unsupported words)
    plain: str  # the sentence built from the evidence, always shown
    cut: bool = False  # the LM's text ended mid-sentence, and the fragment was cut
    raw: str = ""  # the LM's text as written

    @property
    def replaced(self) -> bool:
        """Nothing the LM wrote survived (or it wrote nothing): the reason is the evidence sentence alone."""
        return not self.kept

    @property
    def text(self) -> str:
        return " ".join((self.plain, *self.kept))


def split_sentences(text: str) -> tuple[list[str], bool]:
    """Complete sentences (ending in . ! or ?) and whether a trailing fragment was cut off."""
    text = re.sub(r"\s+", " ", text).strip()
    sentences = [s.strip() for s in _SENTENCE.findall(text) if len(_WORD.findall(s)) >= 2]
    consumed = sum(len(m.group()) for m in _SENTENCE.finditer(text))
    return sentences, bool(text[consumed:].strip())


def _negated(words: Sequence[str], i: int) -> bool:
    return any(w in NEGATIONS for w in words[max(0, i - 3) : i])


def unsupported_words(
    sentence: str,
    evidence: Evidence,
    vocabulary: Vocabulary,
    known_names: Iterable[str] = (),
) -> list[str]:
    """Names and kind words the sentence states that neither the tile nor its neighbours support.

    A name: a capitalised word after the first, or a word that names something elsewhere in the gallery
    (`known_names`, folded tokens). A kind word: a vocabulary term or a water/park/square/rail/tram word.
    A query word counts as supported only where the evidence found it; a miss stated as present is not.
    Words after a negation ("no theatre") are not claims.
    """
    matches = [m for m in re.finditer(_WORD, sentence)]
    folded = [fold(m.group()) for m in matches]
    missed = {t for m in evidence.misses for t in _WORD.findall(fold(m.mention.surface))}
    query_ok = {t for t in _WORD.findall(fold(evidence.query)) if t not in missed}
    known = frozenset(known_names)
    bad: list[str] = []
    kind_spans = []
    for m in vocabulary.mentions(sentence):
        kind_spans.append(m.span)
        i = next((j for j, w in enumerate(matches) if w.start() >= m.span[0]), 0)
        if m.term in GENERIC_WORDS or _negated(folded, i):
            continue
        if m.term in evidence.allowed_words or set(m.preset_ids) & evidence.allowed_presets:
            continue
        bad.append(m.surface)
    for i, (word, token) in enumerate(zip(matches, folded, strict=True)):
        if any(s <= word.start() < e for s, e in kind_spans):
            continue
        surface = word.group()
        if token in _CATEGORY_OF_WORD:
            if token not in evidence.allowed_words and not _negated(folded, i):
                bad.append(surface)
            continue
        looks_like_name = (i > 0 and surface[:1].isupper()) or (
            len(token) >= MIN_NAME_CHARS and token in known
        )
        if not looks_like_name or token in STOPWORDS or token in GENERIC_WORDS or _negated(folded, i):
            continue
        if token in query_ok or any(_token_match(token, n) for n in evidence.allowed_names):
            continue
        bad.append(surface)
    return list(dict.fromkeys(bad))


def check_reason(
    text: str, evidence: Evidence, vocabulary: Vocabulary, known_names: Iterable[str] = ()
) -> CheckedReason:
    """Keep the LM's complete sentences whose every name and kind word is supported; the rest are dropped."""
    sentences, cut = split_sentences(text)
    known = frozenset(known_names)
    kept, dropped = [], []
    for s in sentences:
        bad = unsupported_words(s, evidence, vocabulary, known)
        if bad:
            dropped.append((s, tuple(bad)))
        else:
            kept.append(s)
    return CheckedReason(tuple(sentences), tuple(kept), tuple(dropped), plain_sentence(evidence), cut, text)
