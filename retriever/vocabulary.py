"""OSM place vocabulary from iD's tagging schema: match tags to presets, find place kinds a text names."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from retriever.errors import RetrieverError

DEFAULT_PATH = Path(__file__).parent / "data" / "osm_vocabulary.json"
LANGUAGES = ("en", "fi", "sv")
GEOMETRIES = ("point", "vertex", "line", "area", "relation")
DEFAULT_REGION = "fi"  # the demo is central Helsinki
ADDRESS_PRESET = "address"  # iD's fallback for anything with an addr:* key (iD #4353)
MIN_TERM_CHARS = 3

# How `match` follows iD (modules/presets/index.js matchTags and preset.js matchScore):
# - a preset is a candidate when one of its (key, value) tags, or (key, "*"), is on the feature; it matches
#   when all its `tags` match; score = matchScore (default 1) per exact tag, half of it per "*" tag, plus
#   matchScore per matching `addTags` tag not in `tags`; unsearchable presets score x0.999.
# - the highest score wins; iD keeps the first of equal scores, here the smaller id wins (deterministic).
# - presets whose locationSet leaves out the region (default Finland) never match, as in iD at Helsinki.
# - iD's geometry fallbacks ("point", "line", "area", "relation": no or only area=yes tags) are not in the
#   vocabulary, so tags no preset claims ({"foo": "bar"}) give None, not a kind-less fallback; tags with an
#   addr:* key and nothing else matched give the "address" preset, as iD does.
# - geometry=None considers every geometry; "area", "point" ... restrict to presets drawn that way.

# Codes of iD/NSI locationSets (ISO 3166, UN M49, Wikidata) whose area contains the region; anything else is
# taken as "elsewhere". Finland: itself, Earth ("Q2", "001", "Planet"), Europe ("150", "Q46"), Northern Europe
# ("154", "Q27479") and the EU ("EU", "Q458").
REGION_CODES: dict[str, frozenset[str]] = {
    "fi": frozenset({"fi", "001", "q2", "planet", "150", "q46", "154", "q27479", "eu", "q458"}),
}

# Single-word terms that would fire on almost any description, so `mentions` ignores them (folded forms).
# Terms under 3 characters ("a", "by", "is", "it") are dropped by length anyway. Groups, one a line block:
# 1. English function words.
# 2. English adjectives, verbs and abstract nouns that iD lists as a search term of some preset ("green" golf
#    green, "light" street lamp, "old" antiques, "top" peak, "time" clock, "show" cinema, "play", "run" ...).
# 3. Finnish and Swedish words that are common English words meaning something else ("the" is Swedish for
#    tea, "hem" home, "brand" fire, "mark" ground, "rest" leftovers), given names, or adjectives ("stor",
#    "suuri" big). Found by checking every fi/sv term against an English word list.
STOPWORDS = frozenset(
    """
    about above across after all along also and any are around back been before behind being below beside
    between both but can could did does each even every few for from had has have her here his how its just
    like many may might more most much must near next nor not off once one only onto other our out over own
    per same she should some such than that the their them then there these they this those three through
    too two under until upon very via was were what when where which while who why will with within without
    would yes yet you your

    act adult air area atomic bad big black blue bottom bright broken brown build center centre central check
    clean closed common corner cover cross crowd curved cut dark day double draw east edge empty end event
    eye fall family fan far figure flat flow force free frank front frozen good gray great green grey guard
    half head heart heat help hide high hire image indoor infant key kind king large left legal light lights
    line little live long look looking looks lot lots loud low main middle mind narrow nature new nice night
    noise north old online open party pass photo picture place play point points power pretty print private
    public queen race rain red right ring rough round royal run rush safe safety scan scene scenic screen
    senior shot show showing shows side sight sign signal single sits slow small social sort sound south
    speech speed spirit spring stand standing stands step steps stock sweet switch tall thing things tie time
    tip top trade trust type union used view vision visual voice war watch way west white wide wild wind
    woman women yellow yield young youth

    brand civil charter container convention data destination donation driver era expedition experiment fond
    gang grand hand hem hinder holding hot info installation lever mad mark medium minor mode motion
    observation pale panel plan presenter program puts range representation research resident rest risk
    rose sang spot tag torn vast walker
    ben bob gina jude kari kate kris lana max oliver otto
    etta iso kanssa keskella lahella myos mutta oli pieni suuri tai tama tuo uusi vain valkoinen vanha
    att bara den det fran gammal inte liten med mens mitt nara ocksa och som stor till vid vit
    """.split()
)

_TOKEN = re.compile(r"[^\W_]+")
_JOIN = re.compile(r"[\s\-\u2010\u2011\u2013/]*")  # what may stand between the words of one multi-word term
_NORDIC_SUFFIXES = ("erna", "arna", "orna", "lla", "ssa", "sta", "lle", "lta", "en", "et", "na", "n")
_NORDIC_MIN_STEM = 5  # "järnvägsstationen", "kyrkan", "rautatieasemalla"; short stems misfire on English
# English words that are a fi/sv term plus one of those endings: the only one left in a 100k-word list.
_NOT_NORDIC = frozenset({"historian"})


class VocabularyError(RetrieverError, ValueError):
    """The vocabulary file is missing, malformed, or asked something it cannot answer."""


def fold(text: str) -> str:
    """Accent-fold and casefold: NFKD, combining marks dropped, casefolded ("Järnväg" -> "jarnvag")."""
    if text.isascii():
        return text.lower()
    # Twice: casefolding can itself produce combining marks ("İ" -> "i̇") and NFKD can produce capitals ("Ⅻ").
    for _ in range(2):
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
        text = text.casefold()
    return text


def _fold_with_offsets(text: str) -> tuple[str, list[int] | None]:
    """`fold(text)` and, for each folded character, the index of the original character it came from."""
    if text.isascii():
        return text.lower(), None  # identity offsets
    parts: list[str] = []
    offsets: list[int] = []
    for i, ch in enumerate(text):
        folded = ch.lower() if ch.isascii() else fold(ch)
        parts.append(folded)
        offsets.extend([i] * len(folded))
    return "".join(parts), offsets


def term_key(term: str) -> tuple[str, ...] | None:
    """The folded word tuple a term is indexed under, or None when it is too short or too common to use."""
    words = tuple(_TOKEN.findall(fold(term)))
    if not words or len(" ".join(words)) < MIN_TERM_CHARS:
        return None
    if not any(ch.isalpha() for word in words for ch in word):
        return None  # "420", "4x4" is fine but a bare number is not a kind of place
    if all(word in STOPWORDS for word in words):
        return None
    return words


def _english_stems(word: str) -> list[str]:
    """Singulars to try for a simple English plural: ferries -> ferry, houses -> house, churches -> church."""
    if len(word) < 4 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return []
    stems = [word[:-3] + "y"] if word.endswith("ies") and len(word) > 4 else []
    stems.append(word[:-1])
    if word.endswith(("ses", "xes", "zes", "ches", "shes")):
        stems.append(word[:-2])
    return [s for s in stems if len(s) >= MIN_TERM_CHARS]


def _nordic_stems(word: str) -> list[str]:
    """Stems for Swedish definite forms and a few Finnish case endings (-en, -et, -n, -lla, -ssa ...)."""
    if word in _NOT_NORDIC:
        return []
    return [
        word[: -len(suffix)]
        for suffix in _NORDIC_SUFFIXES
        if word.endswith(suffix) and len(word) - len(suffix) >= _NORDIC_MIN_STEM
    ]


def valid_in_region(location_set: Mapping[str, Any] | None, region: str | None) -> bool:
    """Whether an iD/NSI locationSet covers the region (None: every preset is valid)."""
    if region is None or not location_set:
        return True
    codes = REGION_CODES.get(region.lower(), frozenset({region.lower(), "001", "q2", "planet"}))

    def named(entries: Iterable[Any]) -> set[str]:
        # Point-and-radius entries ([lon, lat, km]) and custom .geojson areas are never treated as ours.
        return {str(e).lower() for e in entries if isinstance(e, str)}

    include = named(location_set.get("include", ["planet"]))
    exclude = named(location_set.get("exclude", []))
    return bool(include & codes) and not (exclude & codes)  # an excluded area that contains the region


@dataclass(frozen=True)
class Preset:
    """One iD preset: the tags that identify it and what people call it in en, fi and sv."""

    id: str
    tags: Mapping[str, str] = field(compare=False)
    geometry: tuple[str, ...]
    match_score: float = 1.0
    add_tags: Mapping[str, str] = field(default_factory=dict, compare=False)
    searchable: bool = True
    names: Mapping[str, str] = field(default_factory=dict, compare=False)
    terms: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    supplement: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    location_set: Mapping[str, Any] | None = field(default=None, compare=False)

    def name(self, language: str = "en") -> str:
        """The preset's (lower-cased) name in a language, falling back to English."""
        return self.names.get(language) or self.names.get("en", "")

    def score(self, tags: Mapping[str, str]) -> float:
        """iD's matchScore: -1 unless every preset tag matches; a "*" value counts half; addTags boost."""
        score = 0.0
        for key, value in self.tags.items():
            if tags.get(key) == value:
                score += self.match_score
            elif value == "*" and key in tags:
                score += self.match_score / 2
            else:
                return -1.0
        for key, value in self.add_tags.items():
            if key not in self.tags and tags.get(key) == value:
                score += self.match_score
        if not self.searchable:
            score *= 0.999  # iD: an equally good searchable preset wins
        return score


@dataclass(frozen=True)
class Mention:
    """A kind of place named in a text: where, the words as written, and the presets the words can mean."""

    span: tuple[int, int]
    surface: str
    preset_ids: tuple[str, ...]
    term: str = ""  # the vocabulary term that matched, folded ("cathedral" for "Cathedrals")


@dataclass(frozen=True)
class _TermIndex:
    entries: dict[tuple[str, ...], tuple[str, ...]]
    english: frozenset[tuple[str, ...]]  # keys from an English term: only these take English plurals
    nordic: frozenset[tuple[str, ...]]  # keys from a fi or sv term: only these take Nordic endings
    first_words: frozenset[str]
    max_words: int

    def lookup(self, key: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(matched key, preset ids) for a word tuple, trying plural and Nordic endings on its last word."""
        hit = self.entries.get(key)
        if hit:
            return key, hit
        head, last = key[:-1], key[-1]
        for stems, allowed in ((_english_stems(last), self.english), (_nordic_stems(last), self.nordic)):
            for stem in stems:
                candidate = head + (stem,)
                if candidate in allowed:  # "domes" is not Swedish "dom" (cathedral) in the plural
                    return candidate, self.entries[candidate]
        return None


def _alternatives(surfaces: Iterable[str]) -> list[str]:
    """Each surface, and for "tram stop / platform" or "kantatie/pääkatu" also each part on its own."""
    out: list[str] = []
    for surface in surfaces:
        if surface:
            out.append(surface)
            if "/" in surface:
                out.extend(part for part in surface.split("/") if part.strip())
    return out


def _build_term_index(presets: Iterable[Preset], languages: tuple[str, ...]) -> _TermIndex:
    """Every name, alias and term of the presets in the languages, folded, with its presets ranked."""
    ranks: dict[tuple[str, ...], dict[str, int]] = {}
    english: set[tuple[str, ...]] = set()
    nordic: set[tuple[str, ...]] = set()
    for preset in presets:
        for lang in languages:
            # Rank: named by the words, then an alias or a project supplement term (curated), then iD's terms.
            groups = (
                (0, (preset.names.get(lang, ""),)),
                (1, preset.aliases.get(lang, ())),
                (1, preset.supplement.get(lang, ())),
                (2, preset.terms.get(lang, ())),
            )
            for rank, surfaces in groups:
                for surface in _alternatives(surfaces):
                    key = term_key(surface)
                    if key is None:
                        continue
                    best = ranks.setdefault(key, {})
                    if rank < best.get(preset.id, 99):
                        best[preset.id] = rank
                    (english if lang == "en" else nordic).add(key)
    # Lower rank first, then by id.
    entries = {key: tuple(sorted(best, key=lambda pid: (best[pid], pid))) for key, best in ranks.items()}
    return _TermIndex(
        entries=entries,
        english=frozenset(english),
        nordic=frozenset(nordic),
        first_words=frozenset(key[0] for key in entries),
        max_words=max((len(key) for key in entries), default=0),
    )


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list | tuple) else ()


def _per_language(entry: Mapping[str, Any], name: str) -> dict[str, tuple[str, ...]]:
    return {lang: _strings(values) for lang, values in (entry.get(name) or {}).items() if values}


def _preset_from_entry(preset_id: str, entry: Mapping[str, Any]) -> Preset:
    """A Preset from one entry of the vocabulary file's "presets" section."""
    try:
        terms = _per_language(entry, "terms")
        supplement = _per_language(entry, "supplement")
        for lang, extra in supplement.items():  # project additions follow iD's own terms
            terms[lang] = tuple(dict.fromkeys(terms.get(lang, ()) + extra))
        geometry = tuple(str(g) for g in entry["geometry"])
        return Preset(
            id=preset_id,
            tags={str(k): str(v) for k, v in entry["tags"].items()},
            geometry=geometry,
            match_score=float(entry.get("matchScore", 1.0)),
            add_tags={str(k): str(v) for k, v in (entry.get("addTags") or {}).items()},
            searchable=bool(entry.get("searchable", True)),
            names={str(k): str(v) for k, v in (entry.get("name") or {}).items()},
            terms=terms,
            aliases=_per_language(entry, "aliases"),
            supplement=supplement,
            location_set=entry.get("locationSet"),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise VocabularyError(f"preset {preset_id!r} in the vocabulary is malformed: {exc!r}") from exc


class Vocabulary:
    """iD presets with names and search terms in en/fi/sv, an iD-style tag matcher and a term finder."""

    def __init__(
        self,
        presets: Mapping[str, Preset],
        brands: Mapping[str, Iterable[str]] | None = None,
        meta: Mapping[str, Any] | None = None,
        region: str | None = DEFAULT_REGION,
    ) -> None:
        self.presets: dict[str, Preset] = dict(presets)
        self.meta: dict[str, Any] = dict(meta or {})
        self.region = region
        self.brands: dict[str, tuple[str, ...]] = {name: tuple(ids) for name, ids in (brands or {}).items()}
        self._brand_index: dict[str, tuple[str, ...]] = {}
        for name, ids in self.brands.items():
            key = " ".join(_TOKEN.findall(fold(name)))
            self._brand_index[key] = tuple(dict.fromkeys(self._brand_index.get(key, ()) + ids))
        # iD's index: (key, value) -> presets with that tag, value "*" included; only presets valid here.
        self._active = [p for p in self.presets.values() if valid_in_region(p.location_set, region)]
        self._by_tag: dict[tuple[str, str], list[Preset]] = {}
        for preset in self._active:
            if preset.id == ADDRESS_PRESET:
                continue  # a fallback only, as in iD
            for key, value in preset.tags.items():
                self._by_tag.setdefault((key, value), []).append(preset)
        self._indexes: dict[tuple[str, ...], _TermIndex] = {}

    @classmethod
    def load(cls, path: str | Path | None = None, *, region: str | None = DEFAULT_REGION) -> Vocabulary:
        """Read a vocabulary file (default: the packaged retriever/data/osm_vocabulary.json, cached)."""
        if path is None:
            return _load_default(region)
        return cls.from_file(path, region=region)

    @classmethod
    def from_file(cls, path: str | Path, *, region: str | None = DEFAULT_REGION) -> Vocabulary:
        """Read a vocabulary file, uncached."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VocabularyError(
                f"no vocabulary file at {path} (build it with `python -m demo.build_vocabulary`)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VocabularyError(f"cannot read the vocabulary file {path}: {exc}") from exc
        return cls.from_dict(doc, region=region)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, region: str | None = DEFAULT_REGION) -> Vocabulary:
        """A Vocabulary from the parsed JSON document that demo.build_vocabulary writes."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("presets"), Mapping):
            raise VocabularyError('a vocabulary document needs a "presets" object')
        presets = {pid: _preset_from_entry(pid, entry) for pid, entry in doc["presets"].items()}
        return cls(presets, brands=doc.get("brands") or {}, meta=doc.get("meta") or {}, region=region)

    def __len__(self) -> int:
        return len(self.presets)

    def __contains__(self, preset_id: object) -> bool:
        return preset_id in self.presets

    def __getitem__(self, preset_id: str) -> Preset:
        try:
            return self.presets[preset_id]
        except KeyError:
            raise KeyError(f"no preset {preset_id!r} in the vocabulary") from None

    def match(self, tags: Mapping[str, str], geometry: str | None = None) -> Preset | None:
        """The preset iD would show for these tags, or None when no preset claims them (notes at the top)."""
        if geometry is not None and geometry not in GEOMETRIES:
            raise VocabularyError(f"geometry must be one of {', '.join(GEOMETRIES)}, not {geometry!r}")
        best: Preset | None = None
        best_score = -1.0
        seen: set[str] = set()
        for key, value in tags.items():
            for candidate in self._by_tag.get((key, value), []) + self._by_tag.get((key, "*"), []):
                if candidate.id in seen or (geometry is not None and geometry not in candidate.geometry):
                    continue
                seen.add(candidate.id)
                score = candidate.score(tags)
                # Highest score wins; iD keeps the first of equals (tag order), we take the smaller id.
                tie = score == best_score and best is not None and candidate.id < best.id
                if score > best_score or tie:
                    best, best_score = candidate, score
        if best is None and any(key.startswith("addr:") for key in tags):
            address = self.presets.get(ADDRESS_PRESET)
            if address is not None and (geometry is None or geometry in address.geometry):
                best = address
        return best

    def words(self, preset: Preset | str, languages: Iterable[str] = ("en",)) -> list[str]:
        """A preset's name, aliases and terms in the languages, deduplicated, in order (for context text)."""
        if isinstance(preset, str):
            preset = self[preset]
        out: dict[str, None] = {}
        for lang in languages:
            for word in (
                preset.names.get(lang, ""),
                *preset.aliases.get(lang, ()),
                *preset.terms.get(lang, ()),
            ):
                if word:
                    out.setdefault(word, None)
        return list(out)

    def _term_index(self, languages: Iterable[str] | None) -> _TermIndex:
        langs = tuple(LANGUAGES if languages is None else dict.fromkeys(languages))
        index = self._indexes.get(langs)
        if index is None:
            index = self._indexes[langs] = _build_term_index(self._active, langs)
        return index

    def kinds_for_term(self, term: str, languages: Iterable[str] | None = None) -> tuple[str, ...]:
        """Preset ids a word or phrase can mean ("cathedral", "market hall", "Järnvägsstationen")."""
        key = tuple(_TOKEN.findall(fold(term)))
        if not key or term_key(term) is None:
            return ()
        hit = self._term_index(languages).lookup(key)
        return hit[1] if hit else ()

    def mentions(self, text: str, languages: Iterable[str] | None = None) -> list[Mention]:
        """Every preset name or term in the text, longest match first at each word, without overlaps."""
        index = self._term_index(languages)
        folded, offsets = _fold_with_offsets(text)
        words: list[str] = []
        spans: list[tuple[int, int]] = []
        for m in _TOKEN.finditer(folded):
            start, end = m.span()
            if offsets is not None:
                start, end = offsets[start], offsets[end - 1] + 1
            words.append(m.group())
            spans.append((start, end))
        # joinable[i]: words i and i+1 are separated only by spaces or hyphens, so they can form one term.
        joinable = [
            _JOIN.fullmatch(text, spans[i][1], spans[i + 1][0]) is not None for i in range(len(words) - 1)
        ]
        found: list[Mention] = []
        i = 0
        while i < len(words):
            hit = None
            if len(words[i]) >= 2:  # a term's first word is never a single letter
                longest = 1
                if words[i] in index.first_words:  # else only a one-word plural or inflected form can match
                    while (
                        longest < index.max_words and i + longest < len(words) and joinable[i + longest - 1]
                    ):
                        longest += 1
                for n in range(longest, 0, -1):
                    hit = index.lookup(tuple(words[i : i + n]))
                    if hit:
                        break
            if hit is None:
                i += 1
                continue
            key, ids = hit
            start, end = spans[i][0], spans[i + n - 1][1]
            found.append(
                Mention(span=(start, end), surface=text[start:end], preset_ids=ids, term=" ".join(key))
            )
            i += n
        return found

    def brand(self, name: str) -> tuple[str, ...]:
        """Preset ids of a brand from the name-suggestion-index ("S-market" -> shop/supermarket), or ()."""
        return self._brand_index.get(" ".join(_TOKEN.findall(fold(name))), ())


@lru_cache(maxsize=4)
def _load_default(region: str | None) -> Vocabulary:
    return Vocabulary.from_file(DEFAULT_PATH, region=region)
