"""Derive retriever/data/osm_vocabulary.json from iD's tagging schema and NSI brands, both from npm."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retriever.vocabulary import DEFAULT_REGION, LANGUAGES, Vocabulary, VocabularyError, valid_in_region

REPO = Path(__file__).resolve().parents[1]  # the repository root, whatever the cwd
DEFAULT_CACHE = REPO / ".cache" / "npm"
DEFAULT_OUT = REPO / "retriever" / "data" / "osm_vocabulary.json"

# Bump when the derived content changes for the same inputs (new fields, new rules, a new supplement).
DERIVATION_VERSION = 1

SCHEMA_PACKAGE = "@openstreetmap/id-tagging-schema"
SCHEMA_VERSION = "7.2.0"
NSI_PACKAGE = "name-suggestion-index"
NSI_VERSION = "8.0.20260918"
# sha256 of the npm tarballs of the pinned versions: a cached tarball is reused only when it matches.
PINNED_SHA256 = {
    (SCHEMA_PACKAGE, "7.2.0"): "5c95a50a232a699778e821b19b8c4b92f1719193ffb9069a88545ed9dff55b6b",
    (NSI_PACKAGE, "8.0.20260918"): "3ee22f0f0a99528ac9c65a57211575defd968e21fd6374e746bfd02e94422121",
}
SCHEMA_FILES = {
    "presets": "package/dist/presets.json",
    **{lang: f"package/dist/translations/{lang}.json" for lang in LANGUAGES},
}
NSI_FILE = "package/dist/json/nsi.json"

# iD's geometry fallbacks carry no kind of place (tags {} or only area=yes): never worth matching.
GEOMETRY_FALLBACKS = frozenset({"point", "vertex", "line", "area", "relation"})

# Project additions, not from iD: words Helsinki descriptions use that iD's terms lack, or iD terms this
# preset should come first for. Kept apart in the file (each preset's "supplement") so a reader can tell
# them from iD's own terms.
SUPPLEMENT: dict[str, dict[str, tuple[str, ...]]] = {
    "amenity/marketplace": {
        "en": ("market hall", "covered market", "market square"),
        "fi": ("kauppahalli", "kauppatori"),
    },
    "place/square": {"en": ("market square",)},
    # iD's Christian preset lists "cathedral" and "chapel" but not "church" (only the generic one has it).
    "amenity/place_of_worship/christian": {"en": ("church", "cathedral"), "sv": ("domkyrka",)},
    # iD names these "Cathedral Building" / "Church Building" and gives them no single-word term.
    "building/cathedral": {"en": ("cathedral",)},
    "building/church": {"en": ("church",)},
    # iD spells landuse=harbour "Harbor" with no "harbour" (British spelling is only on leisure/marina).
    "landuse/harbour": {"en": ("harbour", "port")},
    "man_made/tower": {"en": ("clock tower",)},
    # iD's only "tram stop" is inside "Tram Stop / Platform"; Helsinki maps its stops as railway=tram_stop.
    "railway/tram_stop": {"en": ("tram stop",), "fi": ("raitiovaunupysäkki",), "sv": ("spårvagnshållplats",)},
}


class BuildError(Exception):
    """Fetching or reading the npm sources failed in a way the user can fix."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tarball_name(package: str, version: str) -> str:
    """The file name `npm pack` gives a package: @scope/name@1.0 -> scope-name-1.0.tgz."""
    return f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"


def fetch_command(package: str, version: str, cache: str | Path = ".cache/npm") -> str:
    """The shell command that fetches a tarball into the cache (for messages and the Makefile)."""
    return f"npm pack {package}@{version} --pack-destination {cache}"


def fetch(package: str, version: str, cache: Path) -> Path:
    """The npm tarball of package@version in the cache: reused if its sha256 matches the pin, else packed."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / tarball_name(package, version)
    pinned = PINNED_SHA256.get((package, version))
    if path.is_file() and (pinned is None or sha256(path) == pinned):
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            f"npm is not on PATH; install Node.js/npm, or run `{fetch_command(package, version)}`"
        )
    print(f"fetching {package}@{version} with npm pack ...", file=sys.stderr)
    proc = subprocess.run(
        [npm, "pack", f"{package}@{version}", "--pack-destination", str(cache), "--loglevel", "error"],
        cwd=cache,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        # npm's second error line says why ("notarget No matching version found ..."); the last is a log path.
        lines = [line.removeprefix("npm error").strip() for line in proc.stderr.splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else f"exit code {proc.returncode}"
        raise BuildError(f"npm pack {package}@{version} failed: {detail}")
    if not path.is_file():
        raise BuildError(f"npm pack {package}@{version} did not write {path}")
    if pinned is not None and (got := sha256(path)) != pinned:
        raise BuildError(
            f"{path.name} has sha256 {got}, not the pinned {pinned}: the registry served other bytes"
        )
    return path


def _read_members(tarball: Path, names: Sequence[str]) -> dict[str, Any]:
    """Parsed JSON of named tarball members, read in memory (nothing is extracted to disk)."""
    out: dict[str, Any] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for name in names:
                try:
                    member = tar.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise BuildError(f"{tarball.name} has no file {name}")
                out[name] = json.loads(member.read().decode("utf-8"))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BuildError(f"cannot read {tarball}: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BuildError(f"{tarball.name}: a file is not valid JSON: {exc}") from exc
    return out


def read_schema(tarball: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(presets.json, {lang: translations file}, package.json) from an id-tagging-schema tarball."""
    files = _read_members(tarball, [*SCHEMA_FILES.values(), "package/package.json"])
    translations = {lang: files[SCHEMA_FILES[lang]] for lang in LANGUAGES}
    return files[SCHEMA_FILES["presets"]], translations, files["package/package.json"]


def read_nsi(tarball: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(nsi.json, package.json) from a name-suggestion-index tarball."""
    files = _read_members(tarball, [NSI_FILE, "package/package.json"])
    return files[NSI_FILE], files["package/package.json"]


def _texts(value: Any) -> list[str]:
    """Lower-cased, stripped, deduplicated strings; dist files hold lists, old ones a comma string."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else []
    return list(dict.fromkeys(s.strip().lower() for s in items if isinstance(s, str) and s.strip()))


def _preset_translations(translations: Mapping[str, Any], lang: str) -> Mapping[str, Any]:
    """The {preset id: {name, terms, aliases}} part of a translations file ({lang: {presets: {presets}}})."""
    doc = translations.get(lang) or {}
    doc = doc.get(lang, doc)  # the file nests everything under its language code
    return (doc.get("presets") or {}).get("presets") or {}


def keep_preset(preset_id: str, preset: Mapping[str, Any]) -> bool:
    """Whether a preset can identify a kind of place: real tags, not a field template or geometry fallback."""
    tags = preset.get("tags") or {}
    if preset_id.startswith("@") or any(str(key).startswith("@") for key in tags):
        return False  # "@templates/...": field bundles that other presets include, tagged {"@template": ...}
    return bool(tags) and preset_id not in GEOMETRY_FALLBACKS


def derive_presets(
    presets: Mapping[str, Any],
    translations: Mapping[str, Any],
    supplement: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The vocabulary's "presets" section: every preset with tags and a name, with its words in en/fi/sv."""
    supplement = SUPPLEMENT if supplement is None else supplement
    words = {lang: _preset_translations(translations, lang) for lang in LANGUAGES}
    out: dict[str, dict[str, Any]] = {}
    for preset_id in sorted(presets):
        raw = presets[preset_id]
        if not keep_preset(preset_id, raw):
            continue
        names: dict[str, str] = {}
        aliases: dict[str, list[str]] = {}
        terms: dict[str, list[str]] = {}
        extra: dict[str, list[str]] = {}
        for lang in LANGUAGES:
            entry = words[lang].get(preset_id) or {}
            name = str(entry.get("name") or "").strip().lower()
            if name:
                names[lang] = name
            lang_aliases = [a for a in _texts(entry.get("aliases")) if a != name]
            lang_terms = [t for t in _texts(entry.get("terms")) if t != name and t not in lang_aliases]
            # A supplement term may repeat one of iD's terms: that ranks this preset first for it in mentions.
            named = {name, *lang_aliases}
            lang_extra = [
                t for t in _texts(list((supplement.get(preset_id) or {}).get(lang, ()))) if t not in named
            ]
            for target, values in ((aliases, lang_aliases), (terms, lang_terms), (extra, lang_extra)):
                if values:
                    target[lang] = values
        if not names:
            continue  # nothing to call it by
        # Unsearchable presets stay: iD matches with them (amenity=ferry_terminal, railway=station, shop=*).
        item: dict[str, Any] = {
            "tags": dict(raw["tags"]),
            "geometry": list(raw.get("geometry") or []),
            "matchScore": raw.get("matchScore", 1),
            "name": names,
        }
        if raw.get("addTags"):
            item["addTags"] = dict(raw["addTags"])
        if raw.get("searchable") is False:
            item["searchable"] = False
        if raw.get("locationSet"):
            item["locationSet"] = raw["locationSet"]
        for key, values in (("aliases", aliases), ("terms", terms), ("supplement", extra)):
            if values:
                item[key] = values
        out[preset_id] = item
    return out


def derive_brands(nsi: Mapping[str, Any], vocabulary: Vocabulary) -> dict[str, list[str]]:
    """Brand name -> preset ids, for NSI brands whose locationSet covers Finland (matched like iD would)."""
    categories = nsi.get("nsi", nsi)
    brands: dict[str, set[str]] = {}
    for path in sorted(categories):
        if not path.startswith("brands/") or path.startswith("brands/advertising/"):
            continue  # operators, transit and flags are not brands; a fuel brand's roadside totem is no place
        for item in categories[path].get("items") or []:
            if not valid_in_region(item.get("locationSet"), DEFAULT_REGION):
                continue
            tags = item.get("tags") or {}
            preset = vocabulary.match(tags)
            if preset is None:
                continue
            keys = ("brand", "name", "brand:fi", "name:fi", "brand:sv", "name:sv")
            names = {str(tags[k]).strip() for k in keys if tags.get(k)} | {
                str(item.get("displayName", "")).strip()
            }
            for name in names - {""}:
                brands.setdefault(name, set()).add(preset.id)
    return {name: sorted(ids) for name, ids in sorted(brands.items())}


def derive_vocabulary(
    presets: dict,
    translations: dict[str, dict],
    nsi: Mapping[str, Any] | None = None,
    supplement: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> dict:
    """The vocabulary document (meta less sources, presets, brands) from iD's dist files and nsi.json."""
    derived = derive_presets(presets, translations, supplement)
    doc: dict[str, Any] = {
        "meta": {
            "derivation_version": DERIVATION_VERSION,
            "languages": list(LANGUAGES),
            "presets": len(derived),
            "supplement": "each preset's 'supplement' terms are this project's additions, not iD's",
        },
        "presets": derived,
    }
    if nsi is not None:
        doc["brands"] = derive_brands(nsi, Vocabulary.from_dict(doc))
        doc["meta"]["brands"] = len(doc["brands"])
    return doc


def _source(package_json: Mapping[str, Any], tarball: Path, files: Sequence[str]) -> dict[str, Any]:
    return {
        "package": package_json.get("name"),
        "version": package_json.get("version"),
        "license": package_json.get("license"),
        "tarball": tarball.name,
        "sha256": sha256(tarball),
        "files": sorted(files),
    }


def build_document(schema_tarball: Path, nsi_tarball: Path | None = None) -> dict[str, Any]:
    """The whole vocabulary document from the two npm tarballs, sources recorded in meta."""
    presets, translations, schema_pkg = read_schema(schema_tarball)
    sources = [_source(schema_pkg, schema_tarball, list(SCHEMA_FILES.values()))]
    nsi = None
    if nsi_tarball is not None:
        nsi, nsi_pkg = read_nsi(nsi_tarball)
        sources.append(_source(nsi_pkg, nsi_tarball, [NSI_FILE]))
    doc = derive_vocabulary(presets, translations, nsi)
    doc["meta"]["sources"] = sources
    doc["meta"]["built_by"] = "python -m demo.build_vocabulary"
    return doc


def dumps(doc: Mapping[str, Any]) -> str:
    """Deterministic JSON: sorted keys, compact, one line per preset and per brand (reviewable diffs)."""

    def one(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    sections = []
    for key in sorted(doc):
        value = doc[key]
        if key in ("presets", "brands") and isinstance(value, Mapping) and value:
            body = ",\n".join(f"{one(k)}:{one(value[k])}" for k in sorted(value))
            sections.append(f"{one(key)}:{{\n{body}\n}}")
        else:
            sections.append(f"{one(key)}:{one(value)}")
    return "{\n" + ",\n".join(sections) + "\n}\n"


def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a committed data file is world-readable
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo.build_vocabulary", description=__doc__)
    parser.add_argument(
        "--version", default=SCHEMA_VERSION, help=f"{SCHEMA_PACKAGE} version ({SCHEMA_VERSION})"
    )
    parser.add_argument("--nsi-version", default=NSI_VERSION, help=f"{NSI_PACKAGE} version ({NSI_VERSION})")
    parser.add_argument("--no-brands", action="store_true", help="leave out the NSI brands section")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="npm tarball folder (<repo>/.cache/npm)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output file (retriever/data/...)")
    parser.add_argument("--fetch-only", action="store_true", help="only fetch and verify the tarballs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        started = time.perf_counter()
        schema = fetch(SCHEMA_PACKAGE, args.version, args.cache)
        nsi = None if args.no_brands else fetch(NSI_PACKAGE, args.nsi_version, args.cache)
        if args.fetch_only:
            print("\n".join(f"{p} sha256 {sha256(p)}" for p in (schema, nsi) if p is not None))
            return 0
        doc = build_document(schema, nsi)
        text = dumps(doc)
        write_atomic(args.out, text)
    except (BuildError, VocabularyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    meta = doc["meta"]
    print(
        f"{meta['presets']} presets, {meta.get('brands', 0)} brands, {len(text.encode()) / 1024:.0f} KiB "
        f"in {time.perf_counter() - started:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
