"""What is on this machine: pulled models (`moerun ls`), their removal (`moerun rm`) and
one model's description (`moerun show`). The CLI only renders what this module returns.

Pulled models live in the Hugging Face hub cache (models--ORG--NAME/{blobs,refs,snapshots});
their quantized expert caches under moerun's cache (experts/<fingerprint>-<formats>/, whose
manifest names the snapshot it was built from). A load stamps the snapshot it used
(last-used/<repo folder>/<commit>, an empty file whose mtime is the time) and the quantized
cache it opened (its manifest's mtime), so `ls` can say when each was last used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from moerun import hub, registry
from moerun.config_checks import text_config
from moerun.errors import MoerunError
from moerun.paths import cache_root

STAMPS = "last-used"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tree_size(folder: Path) -> int:
    return sum(_size(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@dataclasses.dataclass
class QuantizedCache:
    """One folder of quantized experts built from a checkpoint."""

    path: Path
    source: str  # the checkpoint folder it was built from (resolved)
    bits: int | None
    formats: str  # e.g. "nf4", "int8", "mxfp4+nf4"
    size: int
    last_used: float  # the manifest's mtime: built or last opened

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "source": self.source,
            "bits": self.bits,
            "formats": self.formats,
            "size_bytes": self.size,
            "last_used": self.last_used,
        }


@dataclasses.dataclass
class PulledRevision:
    """One snapshot of a repo in the Hub cache."""

    repo_id: str
    alias: str | None
    commit: str
    refs: list[str]  # branches or tags that point at it ("main")
    snapshot: Path
    size: int  # bytes of the files it links to (blobs counted once)
    caches: list[QuantizedCache]
    last_used: float | None  # None: never loaded by moerun

    def to_dict(self) -> dict:
        return {
            "repo_id": self.repo_id,
            "alias": self.alias,
            "revision": self.commit,
            "refs": self.refs,
            "snapshot": str(self.snapshot),
            "size_bytes": self.size,
            "last_used": self.last_used,
            "quantized_caches": [c.to_dict() for c in self.caches],
        }


def _repo_folder_id(folder: Path) -> str | None:
    """models--ORG--NAME -> ORG/NAME (None for anything else in the hub cache)."""
    if not folder.name.startswith("models--") or not folder.is_dir():
        return None
    parts = folder.name.removeprefix("models--").split("--")
    return "/".join(parts) if len(parts) >= 2 else None


def quantized_caches() -> list[QuantizedCache]:
    """Every complete quantized expert cache (one with a readable manifest)."""
    root = cache_root() / "experts"
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        manifest = folder / "manifest.json"
        if folder.name.startswith(".") or not manifest.is_file():
            continue  # a build in progress or abandoned
        try:
            m = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        bits = m.get("bits")
        out.append(
            QuantizedCache(
                folder,
                str(m.get("source", "")),
                bits if isinstance(bits, int) else None,
                folder.name.partition("-")[2],
                _tree_size(folder),
                manifest.stat().st_mtime,
            )
        )
    return out


def _stamp(repo_folder: str, commit: str) -> Path:
    return cache_root() / STAMPS / repo_folder / commit


def mark_used(folder: str | Path) -> None:
    """Stamp `folder` as used now, if it is a snapshot of the Hub cache (one empty file's
    mtime; a read-only cache is not an error)."""
    try:
        snapshot = Path(folder).resolve()
        if snapshot.parent.name != "snapshots" or not snapshot.parent.parent.name.startswith("models--"):
            return
        stamp = _stamp(snapshot.parent.parent.name, snapshot.name)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()  # an existing stamp gets a new mtime
    except OSError:
        pass


def _revisions(storage: Path, caches: list[QuantizedCache]) -> list[PulledRevision]:
    repo_id = _repo_folder_id(storage)
    alias = registry.alias_for_repo(repo_id) if repo_id else None
    refs: dict[str, list[str]] = {}
    for ref in sorted((storage / "refs").rglob("*")) if (storage / "refs").is_dir() else []:
        if ref.is_file():
            try:
                refs.setdefault(ref.read_text().strip(), []).append(str(ref.relative_to(storage / "refs")))
            except OSError:
                pass
    out = []
    snapshots = storage / "snapshots"
    for snap in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
        if not snap.is_dir():
            continue
        seen, size = set(), 0
        for f in snap.rglob("*"):
            target = f.resolve()
            if target.is_file() and target not in seen:
                seen.add(target)
                size += _size(target)
        real = str(snap.resolve())
        mine = [c for c in caches if c.source == real or c.source.startswith(real + os.sep)]
        stamp = _stamp(storage.name, snap.name)
        used = [stamp.stat().st_mtime] if stamp.is_file() else []
        used += [c.last_used for c in mine]
        out.append(
            PulledRevision(
                repo_id,
                alias.name if alias else None,
                snap.name,
                refs.get(snap.name, []),
                snap,
                size,
                mine,
                max(used) if used else None,
            )
        )
    return out


def pulled() -> list[PulledRevision]:
    """Every revision of every model in the Hub cache, by repo id then commit."""
    cache = hub.hub_cache_dir()
    caches = quantized_caches()
    out = []
    for storage in sorted(cache.iterdir()) if cache.is_dir() else []:
        if _repo_folder_id(storage):
            out.extend(_revisions(storage, caches))
    return out


def other_caches(revisions: list[PulledRevision] | None = None) -> list[QuantizedCache]:
    """Quantized caches not built from a pulled snapshot: local folders, the demo, or a
    snapshot since deleted (source missing)."""
    revisions = pulled() if revisions is None else revisions
    owned = {c.path for r in revisions for c in r.caches}
    return [c for c in quantized_caches() if c.path not in owned]


# -- rm -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Removal:
    """What `rm` would delete: snapshots, blobs no remaining revision links to, refs to
    the removed commits, quantized caches built from them, their stamps."""

    repo_id: str  # for caches alone: the path or alias they were named by
    revisions: list[PulledRevision]
    paths: list[Path]  # files and folders, deleted in this order
    bytes: int
    whole_repo: bool
    loose_caches: list[QuantizedCache] = dataclasses.field(default_factory=list)  # of no pulled revision

    @property
    def caches(self) -> list[QuantizedCache]:
        return [c for r in self.revisions for c in r.caches] + self.loose_caches

    def apply(self) -> None:
        """Delete: quantized caches first, then links, blobs and refs, the snapshot folders
        last (a removal cut short still leaves `ls` truthful)."""
        for p in self.paths:
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except FileNotFoundError:
                pass


def plan_removal(model: str, revision: str | None = None) -> Removal:
    """The Removal for `model` (an alias or repo id): every revision in the cache, or the
    one `revision` (a commit, a prefix of one, or a ref such as main). Raises MoerunError
    when there is nothing of it in the cache."""
    text = model.strip()
    a = registry.lookup(text)
    if a is not None and a.repo_id == registry.EMBEDDED:
        caches = _caches_of(registry.DEMO_DIR)
        if not caches:
            raise MoerunError(f"'{text}' ships inside moerun and has no quantized cache: there is nothing to remove")
        return _cache_removal(text, caches)
    if text.startswith((".", "/", "~")) or (hub.repo_id_for(text) is None and hub.looks_like_path(text)):
        if revision:
            raise MoerunError("--revision names a revision of a pulled model, not of a folder")
        caches = _caches_of(Path(text))
        if not caches:
            raise MoerunError(
                f"no quantized cache of or at {text} (see `moerun ls`); moerun never deletes a model folder of yours"
            )
        return _cache_removal(text, caches)
    repo_id = hub.repo_id_for(text)
    if repo_id is None:
        raise MoerunError(
            f"'{text}' is not an alias or a Hub repo id: `moerun rm` removes pulled models (see `moerun ls`)"
        )
    storage = hub.hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    every = _revisions(storage, quantized_caches()) if storage.is_dir() else []
    if not every and not storage.is_dir():
        raise MoerunError(f"{repo_id} is not in the local cache ({hub.hub_cache_dir()}); see `moerun ls`")
    chosen = every
    if revision:
        chosen = [r for r in every if revision in r.refs or r.commit.startswith(revision)]
        if len(chosen) != 1:
            have = ", ".join(r.commit[:12] for r in every) or "none"
            raise MoerunError(
                f"{repo_id} has {'no' if not chosen else 'more than one'} revision '{revision}' "
                f"in the cache (revisions: {have})"
            )
    kept = [r for r in every if r not in chosen]
    caches = [c.path for r in chosen for c in r.caches]
    stamps = [_stamp(storage.name, r.commit) for r in chosen]
    if not kept:  # the whole repo folder, partial downloads included
        size = _tree_size(storage) + sum(_tree_size(c) for c in caches)
        return Removal(repo_id, chosen, [*caches, *stamps, storage], size, True)
    keep_blobs = {f.resolve() for r in kept for f in r.snapshot.rglob("*")}
    blobs = {f.resolve() for r in chosen for f in r.snapshot.rglob("*") if f.is_symlink()} - keep_blobs
    blobs = sorted(b for b in blobs if b.is_file())
    refs = [storage / "refs" / name for r in chosen for name in r.refs]
    size = (
        sum(_size(b) for b in blobs) + sum(_tree_size(r.snapshot) for r in chosen) + sum(_tree_size(c) for c in caches)
    )
    return Removal(repo_id, chosen, [*caches, *stamps, *refs, *blobs, *(r.snapshot for r in chosen)], size, False)


def _caches_of(path: Path) -> list[QuantizedCache]:
    """The quantized caches built from the folder `path` (there or gone), or the one cache
    folder `path` is, as `ls` prints them."""
    target = Path(path).expanduser().resolve()
    return [c for c in quantized_caches() if c.path.resolve() == target or Path(c.source) == target]


def _cache_removal(label: str, caches: list[QuantizedCache]) -> Removal:
    """Deleting quantized caches alone (never the folder they were built from), each with
    its verification stamp; its lock file stays, as another process may hold it."""
    paths = [p for c in caches for p in (c.path, c.path.parent / f".{c.path.name}.verified")]
    return Removal(label, [], paths, sum(c.size for c in caches), False, caches)


# -- show -----------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelInfo:
    """What `moerun show` prints about one model."""

    name: str
    repo_id: str | None
    alias: str | None
    folder: Path | None  # None: not on this machine (described from the shipped config)
    source: str  # "folder", "cache" or "shipped config"
    model_type: str | None
    architectures: list[str]
    total_params: int | None
    active_params: int | None
    n_layers: int | None
    n_experts: int | None
    experts_per_token: int | None
    context: int | None
    chat_template: str | None
    license: str | None
    fit: object | None  # moerun.fit.FitReport, from metadata on this machine; None if none
    caches: list[QuantizedCache]

    def to_dict(self) -> dict:
        f = self.fit
        return {
            "name": self.name,
            "repo_id": self.repo_id,
            "alias": self.alias,
            "folder": str(self.folder) if self.folder else None,
            "source": self.source,
            "model_type": self.model_type,
            "architectures": self.architectures,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "n_layers": self.n_layers,
            "n_experts": self.n_experts,
            "experts_per_token": self.experts_per_token,
            "context": self.context,
            "chat_template": self.chat_template is not None,
            "chat_template_head": template_head(self.chat_template) if self.chat_template else None,
            "license": self.license,
            "fit": None
            if f is None
            else {
                "verdict": f.plan.verdict,
                "bits": f.plan.bits,
                "recommended_bits": f.recommended_bits,
                "reason": f.plan.reason,
                "device": f.device,
            },
            "quantized_caches": [c.to_dict() for c in self.caches],
        }


def template_head(template: str, lines: int = 3, width: int = 76) -> list[str]:
    """The first non-blank lines of a chat template, each cut to `width` characters."""
    out = []
    for line in template.splitlines():
        if line.strip():
            line = line.rstrip()
            out.append(line if len(line) <= width else line[: width - 1] + "…")
        if len(out) == lines:
            break
    return out


def read_chat_template(folder: Path) -> str | None:
    """The default chat template, as moerun.tokenizer finds it: chat_template.jinja, else
    tokenizer_config.json's chat_template (a string or named templates), else
    chat_template.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            t = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(t, list):
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        if isinstance(t, str):
            return t
    return None


def read_license(folder: Path) -> str | None:
    """`license:` from the model card's front matter (README.md), when it is here."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    for line in text.splitlines()[1:]:
        if line.strip() == "---":
            break
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


def show(model: str, revision: str | None = None) -> ModelInfo:
    """Describe `model` from what is on this machine: the local folder or cached snapshot,
    else (an alias not pulled) the config shipped with moerun. No network."""
    from moerun import fit as fitting

    text = model.strip()
    repo_id = hub.repo_id_for(text)
    a = registry.lookup(text) or (registry.alias_for_repo(repo_id) if repo_id else None)
    folder = None
    if repo_id is None or hub.is_cached(repo_id, revision):
        folder = hub.resolve(text if repo_id is None else repo_id, revision)  # a folder, the demo, or the cache
    if folder is not None:
        config = hub.read_config(folder)
        source = "cache" if repo_id else ("shipped with moerun" if a is not None else "folder")
        meta = fitting.folder_metadata(folder, source, text) if any(folder.glob("*.safetensors")) else None
    else:
        config = registry.shipped_config(a.name) if a else None
        if config is None:
            raise MoerunError(
                f"{repo_id} is not in the local cache and moerun ships no config for it: "
                f"`moerun pull {repo_id}` first (or `moerun fit {repo_id}` reads it from the Hub)"
            )
        source, meta = "shipped config", fitting.shipped_metadata(a.name)
    report = None
    if meta is not None:
        try:
            report = fitting.fit(text, meta=meta, measure=False)
        except MoerunError:
            report = None  # an unknown family: show what the config says, no verdict
    tc = text_config(config)
    s = report.summary if report else None
    n_experts = tc.get("num_local_experts") or tc.get("num_experts") or tc.get("n_routed_experts")
    per_token = tc.get("num_experts_per_tok") or tc.get("num_experts_per_token")
    real = str(folder.resolve()) if folder is not None else None
    caches = [c for c in quantized_caches() if real and (c.source == real or c.source.startswith(real + os.sep))]
    return ModelInfo(
        name=text,
        repo_id=repo_id,
        alias=a.name if a else None,
        folder=folder,
        source=source,
        model_type=config.get("model_type"),
        architectures=list(config.get("architectures") or []),
        total_params=s.total_params if s else None,
        active_params=s.active_params if s else None,
        n_layers=(s.n_layers if s else tc.get("num_hidden_layers")),
        n_experts=(s.n_experts if s else n_experts),
        experts_per_token=(s.experts_per_token if s else per_token),
        context=(s.max_context if s else tc.get("max_position_embeddings")),
        chat_template=read_chat_template(folder) if folder is not None else None,
        license=read_license(folder) if folder is not None else None,
        fit=report,
        caches=caches,
    )


def ago(t: float | None, now: float | None = None) -> str:
    """'never', 'just now', '5 minutes ago', '3 days ago'."""
    if t is None:
        return "never"
    s = max((now or time.time()) - t, 0)
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= n:
            k = int(s // n)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"
