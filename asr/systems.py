"""What a *system* is: a folder that turns frames into pdf scores, and the priors it is decoded with.

A system is the monophone or triphone GMM (its own log-likelihoods), a member or a distilled
student (a ``model.pt`` beside ``post/<set>.npy``), or an ensemble (``ensemble/post_<k>/`` with
``members.json``). Neural systems are decoded in hybrid fashion, ``acwt * (log p(s|x) - log p(s))``,
with count priors from the training alignment or the system's own posterior priors. The ``asr
decode`` command, which decodes and scores systems on prepared sets, is ``asr.decode``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr.io import read_json

__all__ = ["PRIOR_KINDS", "SetPaths", "System", "SystemDirError", "open_system", "posterior_prior_path",
           "system_log_prior"]


class SystemDirError(ValueError):
    """The system directory is not something ``asr decode`` knows how to score."""


@dataclass(frozen=True)
class SetPaths:
    """Where one prepared set lives: ``name`` is its directory name under data/, feats/, ali/."""

    name: str
    manifest: Path
    feats_dir: Path
    ali_dir: Path | None

    @classmethod
    def from_exp(cls, exp_dir: str | os.PathLike, name: str, ali_root: str = "ali") -> "SetPaths":
        """``ali_root``: the folder of reference alignments under ``exp_dir`` (``ali_tri`` scores a
        triphone system against its own tied-state labels)."""
        exp = Path(exp_dir)
        ali = exp / ali_root / name
        return cls(name, exp / "data" / name / "manifest.jsonl", exp / "feats" / name,
                   ali if (ali / "labels.npy").is_file() else None)


@dataclass(frozen=True)
class System:
    """A decodable system: ``info`` is what goes into ``system.json``."""

    info: dict
    dir: Path

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def kind(self) -> str:
        return str(self.info["kind"])


def _model_meta(model_path: Path) -> dict:
    from asr.models import load_model

    _, meta = load_model(model_path)
    return meta


def open_system(system_dir: str | os.PathLike, name: str | None = None) -> System:
    """Recognise a system directory and describe it (kind, name, parameter count, ...)."""
    d = Path(system_dir)
    if (d / "choice.json").is_file() and not (d / "model.pt").is_file():
        # A distillation folder: the student chosen on dev (choice.json) stands for it.
        d = d / read_json(d / "choice.json")["best_dir"]
    if (d / "final.mdl").is_file():
        from asr.gmm_model import GmmModel

        model = GmmModel.load(d / "final.mdl")
        params = int(model.num_gauss * (2 * model.dim + 1))
        info = {"name": name or ("gmm-tri" if model.tree is not None else "gmm-mono"), "kind": "gmm",
                "params": params, "num_gauss": int(model.num_gauss), "num_pdfs": int(model.num_pdfs),
                "context": "triphone" if model.tree is not None else "monophone"}
    elif (d / "model.pt").is_file():
        meta = _model_meta(d / "model.pt")
        if meta.get("kind") == "distilled" or "temperature" in meta:
            from asr.distill import temperature_name

            t = float(meta["temperature"])
            variant = d.parent.name                   # distill/ (the reported student), distill_paper/, ...
            prefix = "distilled" if variant == "distill" else f"distilled-{variant.removeprefix('distill_')}"
            info = {"name": name or f"{prefix}-{temperature_name(t)}", "kind": "distilled", "variant": variant,
                    "params": int(meta["params"]), "seed": int(meta["seed"]), "temperature": t,
                    "hard_weight": float(meta.get("hard_weight", float("nan")))}
        else:
            info = {"name": name or f"member-seed{int(meta['seed'])}", "kind": "member",
                    "params": int(meta["params"]), "seed": int(meta["seed"])}
        info["arch"] = meta.get("arch", {}).get("name") if isinstance(meta.get("arch"), dict) else None
        info["num_pdfs"] = int(meta["num_pdfs"]) if "num_pdfs" in meta else None
    elif (d / "members.json").is_file():
        members = read_json(d / "members.json")["members"]
        metas = [_model_meta(Path(m) / "model.pt") for m in members]
        params = sum(int(m["params"]) for m in metas)
        info = {"name": name or f"ensemble-{len(members)}", "kind": "ensemble", "params": params,
                "num_pdfs": int(metas[0]["num_pdfs"]) if metas and "num_pdfs" in metas[0] else None,
                "members": len(members), "member_dirs": members,
                "mode": read_json(d / "members.json").get("mode", "arithmetic")}
    else:
        raise SystemDirError(f"{d}: not a system directory (expected final.mdl, model.pt or members.json)")
    return System(info, d)


def _post_path(system: System, set_name: str) -> Path:
    base = system.dir if system.kind == "ensemble" else system.dir / "post"
    p = base / f"{set_name}.npy"
    if not p.is_file():
        raise SystemDirError(f"{system.name}: no posteriors for {set_name} ({p}); compute them first")
    return p


PRIOR_KINDS = ("count", "posterior")


def posterior_prior_path(system: System) -> Path | None:
    """The system's own mean posterior over the training frames (``priors.npy``), if it has one."""
    if system.kind == "gmm":
        return None
    p = system.dir / "priors.npy"
    return p if p.is_file() else None


def system_log_prior(system: System, kind: str, count_log_prior: np.ndarray | None) -> np.ndarray | None:
    """Log-priors of ``kind``: ``count`` (the training alignment's label counts) or ``posterior``
    (the system's mean posterior over the training frames, Kaldi's nnet3-am-adjust-priors)."""
    if kind == "count":
        return count_log_prior
    p = posterior_prior_path(system)
    if p is None:
        raise SystemDirError(f"{system.name}: no posterior priors ({system.dir / 'priors.npy'}); "
                             f"retrain or decode with count priors")
    pri = np.load(p, allow_pickle=False).astype(np.float64)
    if count_log_prior is not None and pri.shape != count_log_prior.shape:
        raise SystemDirError(f"{p}: {pri.shape[0]} pdfs, the count priors have {count_log_prior.shape[0]}")
    return np.log(pri)
