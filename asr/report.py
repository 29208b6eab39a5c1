"""The results report: ``RESULTS.md``, ``results.json`` and plots for one corpus.

Everything is read from what earlier stages wrote, never recomputed from models:

- ``decode/<system>/system.json``: ``{name, kind, params, num_pdfs, seed?, members?, temperature?, hard_weight?}``
- ``decode/<system>/<set>/wer.json`` (``wer`` in percent), ``frame_acc.json`` (``frame_acc``,
  percent), ``per_utt`` (Kaldi ``#csid`` lines, for the paired bootstrap)
- ``decode/<system>/tune.json``: ``{acwt, lm_weight}`` chosen on dev by the decode stage
- ``distill/choice.json``: the temperature chosen on dev by :mod:`asr.distill`
- ``members/*/train_log.csv`` and ``distill/*/train_log.csv``: training curves

``results.json`` also records under ``provenance`` what the figures depend on beyond the data
(:func:`asr.provenance.provenance`: package and espeak-ng versions, torch threads, CPU, commit).

Choices (documented in RESULTS.md as well):

- The baseline of the paper-style table is the *mean* over the members (``member-mean``), with
  the standard deviation over members beside it.
- Paired bootstrap tests need one real system per side, so there "baseline" is the member with
  the median WER on that set (lower median for an even number of members). Pooling the members'
  per-utterance errors would compare against an average that no single model achieves.
- The reported distilled model is the one chosen by ``distill/choice.json`` (best dev frame
  accuracy); without that file, the distilled system with the best frame accuracy on the first
  dev set decoded. Test sets are never used to choose.
- Whatever the numbers show is written down: when the ensemble does not beat the members, or the
  distilled model keeps none of the gain, the report says so in words.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

from asr.io import atomic_path, atomic_write_json, atomic_write_text, read_json
from asr.provenance import provenance
from asr.significance import PerUttError, align_utt_errors, paired_bootstrap_wer, read_per_utt

__all__ = [
    "ReportError",
    "KINDS",
    "PAPER_TABLE1",
    "collect_systems",
    "member_mean",
    "build_results",
    "format_table",
    "print_table",
    "write_plots",
    "write_results_md",
    "build_report",
    "data_checks",
    "data_checks_md",
    "add_cli",
]

log = logging.getLogger(__name__)

KINDS = ("gmm", "member", "member-mean", "ensemble", "distilled")
_KIND_ORDER = {k: i for i, k in enumerate(KINDS)}

# Hinton, Vinyals & Dean (2015), Table 1: test frame accuracy / WER (percent).
PAPER_TABLE1 = {
    "baseline": (58.9, 10.9),
    "ensemble": (61.1, 10.7),
    "distilled": (60.8, 10.7),
}


class ReportError(ValueError):
    """A results file is missing a field or contradicts another; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Reading


def _num(x: Any) -> float | None:
    """JSON number -> float, with NaN / missing -> None (results.json never holds NaN)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def _infer_system(name: str) -> dict:
    """system.json fallback from the naming convention (gmm-mono, member-seed<i>, ...)."""
    if name.startswith("gmm"):
        return {"name": name, "kind": "gmm"}
    m = re.fullmatch(r"member-seed(\d+)", name)
    if m:
        return {"name": name, "kind": "member", "seed": int(m.group(1))}
    m = re.fullmatch(r"ensemble-(\d+)", name)
    if m:
        return {"name": name, "kind": "ensemble", "members": int(m.group(1))}
    m = re.fullmatch(r"distilled-T([0-9.]+)", name)
    if m:
        return {"name": name, "kind": "distilled", "temperature": float(m.group(1))}
    if name == "member-mean":
        return {"name": name, "kind": "member-mean"}
    raise ReportError(f"decode/{name}: no system.json and the name follows no known pattern")


def discover_sets(exp_dir: str | os.PathLike) -> list[str]:
    """Set names that have a ``wer.json`` under some ``decode/<system>/``, dev sets first."""
    decode = Path(exp_dir) / "decode"
    names = {p.parent.name for p in decode.glob("*/*/wer.json")}
    return sorted(names, key=lambda s: (not s.startswith("dev"), s))


def _system_info(sdir: Path, sets: Sequence[str]) -> dict | None:
    """What ``decode/<name>/system.json`` says the system is, or what its name says when the file is
    missing (None: nothing scored there, not a system). The kind is checked against :data:`KINDS`."""
    sj = sdir / "system.json"
    if sj.is_file():
        info = read_json(sj)
        if not isinstance(info, dict) or "kind" not in info:
            raise ReportError(f"{sj}: needs at least 'kind'")
        info.setdefault("name", sdir.name)
    else:
        if not any((sdir / s / "wer.json").is_file() for s in sets):
            return None
        log.warning("%s missing; inferring the system from its name", sj)
        info = _infer_system(sdir.name)
    if info["kind"] not in KINDS:
        raise ReportError(f"{sj}: kind {info['kind']!r} is not one of {KINDS}")
    return info


def _system_row(info: dict, sj: Path) -> dict[str, Any]:
    """A row's identity: name, kind, size, and the field its kind is ordered and grouped by (a
    member's seed, an ensemble's size, a student's temperature, hard weight and variant)."""
    row: dict[str, Any] = {"name": str(info["name"]), "kind": info["kind"], "params": info.get("params"),
                           "num_pdfs": info.get("num_pdfs")}
    if info["kind"] == "member":
        if "seed" not in info:
            raise ReportError(f"{sj}: a member needs 'seed'")
        row["seed"] = int(info["seed"])
    if info["kind"] == "ensemble":
        if "members" not in info:
            raise ReportError(f"{sj}: an ensemble needs 'members'")
        row["members"] = info["members"]
    if info["kind"] == "distilled":
        if "temperature" not in info:
            raise ReportError(f"{sj}: a distilled system needs 'temperature'")
        row["temperature"] = float(info["temperature"])
        row["hard_weight"] = _num(info.get("hard_weight"))
        row["variant"] = str(info.get("variant", "distill"))
    return row


def _set_scores(sdir: Path, sets: Sequence[str]) -> tuple[dict, dict]:
    """Frame accuracy and WER of one system per set (None where not decoded or scored);
    ``frame_acc.json`` overrides the frame accuracy in ``wer.json``."""
    frame_acc, wers = {}, {}
    for s in sets:
        wer = fa = None
        wj = sdir / s / "wer.json"
        if wj.is_file():
            w = read_json(wj)
            if "wer" not in w:
                raise ReportError(f"{wj}: no 'wer' field")
            wer = _num(w["wer"])
            fa = _num(w.get("frame_acc"))
        fj = sdir / s / "frame_acc.json"
        if fj.is_file():
            fa = _num(read_json(fj).get("frame_acc"))
        frame_acc[s] = fa
        wers[s] = wer
    return frame_acc, wers


def collect_systems(exp_dir: str | os.PathLike, sets: Sequence[str]) -> list[dict]:
    """One row per decoded system (member-mean excluded: the report computes it).

    Each row: ``name, kind, params, num_pdfs`` (+ ``seed`` / ``members`` / ``temperature`` / ``hard_weight``),
    ``frame_acc`` and ``wer`` dicts keyed by set (None where the set was not decoded or scored).
    """
    decode = Path(exp_dir) / "decode"
    if not decode.is_dir():
        raise ReportError(f"{decode} does not exist: decode some systems first")
    rows = []
    # Hidden folders hold recipe stamps; "<name>.old" is an outdated copy kept by a rebuild and
    # "<name>.partial" a failed rebuild kept for resuming.
    for sdir in sorted(p for p in decode.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and not p.name.endswith((".old", ".partial"))):
        info = _system_info(sdir, sets)
        if info is None or info["kind"] == "member-mean":
            continue
        row = _system_row(info, sdir / "system.json")
        row["frame_acc"], row["wer"] = _set_scores(sdir, sets)
        row["_dir"] = str(sdir)
        rows.append(row)
    rows += _undecoded_ensembles(Path(exp_dir), sets, {r["members"] for r in rows if r["kind"] == "ensemble"})
    names = [r["name"] for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ReportError(f"{decode}: system names used twice: {dup}")
    return rows


def _undecoded_ensembles(exp_dir: Path, sets: Sequence[str], decoded_sizes: set) -> list[dict]:
    """Ensembles that only have frame accuracy (``ensemble/post_<k>/frame_acc.json``): the
    ensemble-size curve needs every size, WER only a few."""
    rows = []
    for fj in sorted((exp_dir / "ensemble").glob("post_*/frame_acc.json")):
        k = int(fj.parent.name.split("_")[1])
        if k in decoded_sizes or k == 1:
            continue
        fa = read_json(fj).get("frame_acc", {})
        rows.append({"name": f"ensemble-{k}", "kind": "ensemble", "params": None, "members": k,
                     "frame_acc": {s: _num(fa.get(s)) for s in sets}, "wer": {s: None for s in sets}})
    return rows


def _seed_of(member_dir: str) -> int | None:
    m = re.search(r"seed(\d+)/?$", str(member_dir))
    return int(m.group(1)) if m else None


def missing_members(exp_dir: str | os.PathLike, members: Sequence[dict], sets: Sequence[str]) -> list[str]:
    """What the member family lacks: one entry per recipe member (``members/members.json`` and the
    member lists of ``ensemble/post_*/members.json``) that has no decoded result on some set.

    The baseline is a mean over the family; averaging whatever files happen to exist would report
    fewer members than were trained, with nothing to say so.
    """
    exp_dir = Path(exp_dir)
    seeds: set[int] = {int(m["seed"]) for m in members}
    listing = exp_dir / "members" / "members.json"
    if listing.is_file():
        rows = read_json(listing)
        seeds |= {int(r["seed"]) for r in rows if isinstance(r, dict) and "seed" in r}
    for mj in (exp_dir / "ensemble").glob("post_*/members.json"):
        seeds |= {s for s in map(_seed_of, read_json(mj).get("members", [])) if s is not None}
    by_seed = {int(m["seed"]): m for m in members}
    out = []
    for seed in sorted(seeds):
        m = by_seed.get(seed)
        lacking = [s for s in sets if m is None or m["wer"].get(s) is None]
        if lacking:
            out.append(f"member-seed{seed} ({'not decoded' if m is None else 'no ' + ', '.join(lacking)})")
    return out


def _ensemble_size(row: dict) -> int:
    m = row.get("members")
    return len(m) if isinstance(m, (list, tuple)) else int(m)


def _sort_key(row: dict) -> tuple:
    k = row["kind"]
    if k == "member":
        sub: float = row["seed"]
    elif k == "ensemble":
        sub = _ensemble_size(row)
    elif k == "distilled":
        sub = row["temperature"]
    else:
        sub = 0
    return (_KIND_ORDER[k], sub, row["name"])


def member_mean(members: Sequence[dict], sets: Sequence[str]) -> dict | None:
    """The ``member-mean`` row: mean and (population) std over members, per set and metric.

    A set where some member lacks a value uses the members that have one.
    """
    if not members:
        return None
    row: dict[str, Any] = {"name": "member-mean", "kind": "member-mean",
                           "params": members[0].get("params"), "num_pdfs": members[0].get("num_pdfs"),
                           "num_members": len(members),
                           "seeds": [m["seed"] for m in members]}
    for metric in ("frame_acc", "wer"):
        row[metric] = {}
        row[metric + "_std"] = {}
        for s in sets:
            vals = [m[metric].get(s) for m in members if m[metric].get(s) is not None]
            row[metric][s] = statistics.fmean(vals) if vals else None
            row[metric + "_std"][s] = statistics.pstdev(vals) if vals else None
    return row


# ---------------------------------------------------------------------------------------------
# Results


def _pick_distilled(exp_dir: Path, distilled: list[dict], sets: Sequence[str]) -> tuple[dict | None, str]:
    if not distilled:
        return None, "no distilled system was decoded"
    choice_file = exp_dir / "distill" / "choice.json"
    if choice_file.is_file():
        choice = read_json(choice_file)
        t = _num(choice.get("best_temperature"))
        for r in distilled:
            if t is not None and math.isclose(r["temperature"], t):
                crit = choice.get("criterion", "dev frame accuracy")
                return r, f"T = {t:g}, chosen by {crit} on {choice.get('dev_set', 'dev')} (distill/choice.json)"
        log.warning("%s chose T=%s but no distilled system with that temperature was decoded", choice_file, t)
    dev = [s for s in sets if s.startswith("dev")]
    for s in dev:
        scored = [r for r in distilled if r["frame_acc"].get(s) is not None]
        if scored:
            best = max(scored, key=lambda r: (r["frame_acc"][s], -r["temperature"]))
            return best, f"T = {best['temperature']:g}, best frame accuracy on {s} among the decoded students"
    best = sorted(distilled, key=lambda r: (abs(r["temperature"] - 2.0), r["temperature"]))[0]
    return best, (f"T = {best['temperature']:g}: no dev set was scored, so the paper's choice (closest to T = 2) "
                  "is shown; it was NOT chosen on data")


def _median_member(members: list[dict], s: str) -> dict | None:
    scored = sorted((m for m in members if m["wer"].get(s) is not None), key=lambda m: (m["wer"][s], m["seed"]))
    return scored[(len(scored) - 1) // 2] if scored else None


def _bootstrap(a: dict, b: dict, s: str, num_samples: int, seed: int) -> dict | None:
    pa = Path(a["_dir"]) / s / "per_utt"
    pb = Path(b["_dir"]) / s / "per_utt"
    if not (pa.is_file() and pb.is_file()):
        return None
    try:
        ea, eb, ref = align_utt_errors(read_per_utt(pa), read_per_utt(pb), a["name"], b["name"])
    except PerUttError as e:
        log.warning("paired bootstrap %s vs %s on %s skipped: %s", a["name"], b["name"], s, e)
        return None
    res = paired_bootstrap_wer(ea, eb, ref, num_samples=num_samples, seed=seed)
    return {"set": s, "a": a["name"], "b": b["name"], **res}


def _gain_kept(mm: dict | None, ens: dict | None, dist: dict | None, s: str) -> dict:
    """(distilled - baseline) / (ensemble - baseline) per metric (WER: lower is better); None
    where a number is missing or the ensemble has no gain."""
    g: dict[str, float | None] = {}
    for metric in ("frame_acc", "wer"):
        vals = [r[metric].get(s) if r else None for r in (mm, ens, dist)]
        if None in vals:
            g[metric] = None
            continue
        base, e, d = vals
        improvement = (e - base) if metric == "frame_acc" else (base - e)
        kept = (d - base) if metric == "frame_acc" else (base - d)
        g[metric] = kept / improvement if improvement > 0 else None
    return g


def describe_variant(variant_dir: Path) -> str:
    """What a student variant did, in words, from its ``config.yaml`` and ``.done``."""
    import yaml

    c = yaml.safe_load((variant_dir / "config.yaml").read_text()) if (variant_dir / "config.yaml").is_file() else {}
    done = read_json(variant_dir / ".done") if (variant_dir / ".done").is_file() else {}
    parts = []
    if c.get("soft_targets") == "cache":
        parts.append(f"cached top-{c.get('topk')} targets ({c.get('tail')} tail)")
    else:
        parts.append("online targets")
    parts.append("+ transfer set" if done.get("transfer") else "training frames only")
    aug = [f"{k} {c[k]}" for k in ("freq_mask", "time_mask", "mixup") if c.get(k)]
    if aug:
        parts.append("augmentation: " + ", ".join(aug))
    parts.append(f"hard weight {c.get('hard_weight')}")
    if c.get("epochs"):
        parts.append(f"epoch cap {c['epochs']}")
    return "; ".join(parts)


def _ablation(exp_dir: Path, rows: list[dict], mm: dict | None, ens: dict | None, sets: Sequence[str],
              students: Sequence[str]) -> list[dict]:
    """One row per student variant (``students`` order, e.g. the paper's recipe first): its chosen
    student's numbers and the share of the ensemble gain it keeps."""
    out = []
    for variant in students:
        vdir = exp_dir / variant
        choice = read_json(vdir / "choice.json") if (vdir / "choice.json").is_file() else None
        match = [r for r in rows if r["kind"] == "distilled" and r.get("variant") == variant
                 and choice is not None and math.isclose(r["temperature"], float(choice["best_temperature"]))]
        if not match:
            log.warning("student variant %s: no decoded student (is stage 8 done?)", variant)
            continue
        r = match[0]
        out.append({"variant": variant, "name": r["name"], "temperature": r["temperature"],
                    "description": describe_variant(vdir), "frame_acc": r["frame_acc"], "wer": r["wer"],
                    "gain_kept": {s: _gain_kept(mm, ens, r, s)["frame_acc"] for s in sets}})
    return out


def _significance(members: list[dict], ens_full: dict | None, best_dist: dict | None, sets: Sequence[str],
                  num_samples: int, seed: int) -> tuple[list[dict], dict[str, str | None]]:
    """Paired bootstraps per set: median member vs ensemble, median member vs student, ensemble vs
    student. Returns the tests and the median member named on each set."""
    significance: list[dict] = []
    baseline_member: dict[str, str | None] = {}
    for s in sets:
        med = _median_member(members, s)
        baseline_member[s] = med["name"] if med else None
        pairs = [(med, ens_full), (med, best_dist), (ens_full, best_dist)]
        for a, b in pairs:
            if a is None or b is None or a is b:
                continue
            res = _bootstrap(a, b, s, num_samples, seed)
            if res is not None:
                significance.append(res)
    return significance, baseline_member


def _tuning(rows: list[dict]) -> dict[str, dict]:
    """The decoding weights each system's ``tune.json`` chose on dev."""
    tuning = {}
    for r in rows:
        if "_dir" in r and (Path(r["_dir"]) / "tune.json").is_file():
            t = read_json(Path(r["_dir"]) / "tune.json")
            tuning[r["name"]] = {k: t.get(k) for k in ("acwt", "lm_weight", "word_ins_penalty") if k in t}
    return tuning


def build_results(
    exp_dir: str | os.PathLike,
    corpus: str,
    sets: Sequence[str],
    bootstrap_samples: int = 1000,
    bootstrap_seed: int = 0,
    students: Sequence[str] = (),
    allow_incomplete: bool = False,
) -> dict:
    """Gather every decoded system into the ``results.json`` structure (see the module doc).

    A member family with results missing (see :func:`missing_members`) is an error, unless
    ``allow_incomplete``: then ``incomplete`` lists what is missing and the table says so.
    """
    exp_dir = Path(exp_dir)
    sets = list(sets)
    rows = collect_systems(exp_dir, sets)
    members = sorted((r for r in rows if r["kind"] == "member"), key=lambda r: r["seed"])
    incomplete = missing_members(exp_dir, members, sets)
    if incomplete and not allow_incomplete:
        raise ReportError(f"{exp_dir}: incomplete member family, the baseline would average fewer members "
                          f"than were trained: {'; '.join(incomplete)}. Rerun the recipe (it rebuilds missing "
                          "results), or pass --allow-incomplete to report them as missing")
    mm = member_mean(members, sets)
    if mm is not None:
        rows.append(mm)
    rows.sort(key=_sort_key)
    ensembles = [r for r in rows if r["kind"] == "ensemble"]
    ens_full = max(ensembles, key=_ensemble_size) if ensembles else None
    distilled = sorted((r for r in rows if r["kind"] == "distilled" and r.get("variant", "distill") == "distill"),
                       key=lambda r: r["temperature"])
    best_dist, dist_reason = _pick_distilled(exp_dir, distilled, sets)
    gain = {s: _gain_kept(mm, ens_full, best_dist, s) for s in sets}
    significance, baseline_member = _significance(members, ens_full, best_dist, sets, bootstrap_samples,
                                                  bootstrap_seed)
    tuning = _tuning(rows)
    choice_file = exp_dir / "distill" / "choice.json"
    distill_choice = read_json(choice_file) if choice_file.is_file() else None

    diag_file = exp_dir / "distill" / "diagnostics.json"
    systems = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    return {
        "corpus": corpus,
        "sets": sets,
        "systems": systems,
        "baseline": "member-mean" if mm else None,
        "ensemble": ens_full["name"] if ens_full else None,
        "distilled": best_dist["name"] if best_dist else None,
        "distilled_choice_reason": dist_reason,
        "gain_kept": gain,
        "bootstrap_baseline_member": baseline_member,
        "significance": significance,
        "bootstrap": {"num_samples": bootstrap_samples, "seed": bootstrap_seed,
                      "baseline": "median-WER member per set"},
        "tuning": tuning,
        "distill_choice": distill_choice,
        "diagnostics": read_json(diag_file) if diag_file.is_file() else None,
        "ablation": _ablation(exp_dir, rows, mm, ens_full, sets, students),
        "incomplete": incomplete,
    }


# ---------------------------------------------------------------------------------------------
# Text


def _f(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _g(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def _row(results: dict, name: str | None) -> dict | None:
    if name is None:
        return None
    return next((r for r in results["systems"] if r["name"] == name), None)


def _paper_rows(results: dict, s: str) -> list[tuple[str, str, str]]:
    base = _row(results, results.get("baseline"))
    ens = _row(results, results.get("ensemble"))
    dist = _row(results, results.get("distilled"))
    out = []
    if base:
        out.append((f"Baseline (mean of {base['num_members']} members, ± std)",
                    f"{_f(base['frame_acc'][s])} ± {_f(base['frame_acc_std'][s])}",
                    f"{_f(base['wer'][s])} ± {_f(base['wer_std'][s])}"))
    if ens:
        out.append((f"{_ensemble_size(ens)}-member ensemble ({ens['name']})",
                    _f(ens["frame_acc"][s]), _f(ens["wer"][s])))
    if dist:
        out.append((f"Distilled single model ({dist['name']})", _f(dist["frame_acc"][s]), _f(dist["wer"][s])))
    return out


def format_table(results: dict) -> str:
    """The paper-style table of every set as plain text, for the terminal."""
    lines = [f"Results for {results['corpus']} (frame accuracy / WER, percent)"]
    if results.get("incomplete"):
        lines.append(f"WARNING: INCOMPLETE MEMBER FAMILY, the baseline averages only what exists; missing: "
                     f"{'; '.join(results['incomplete'])}")
    for s in results["sets"]:
        rows = _paper_rows(results, s)
        if not rows:
            continue
        w = max(len(r[0]) for r in rows)
        lines.append("")
        lines.append(f"{s}:")
        lines.append(f"  {'System'.ljust(w)}  {'Frame acc.':>16}  {'WER':>14}")
        for name, fa, wer in rows:
            lines.append(f"  {name.ljust(w)}  {fa:>16}  {wer:>14}")
        g = results["gain_kept"].get(s, {}).get("frame_acc")
        lines.append(f"  share of the ensemble's frame-accuracy gain kept by distillation: "
                     f"{'n/a (no gain to keep)' if g is None else f'{100 * g:.0f}%'}")
    return "\n".join(lines)


def print_table(results: dict | str | os.PathLike) -> None:
    """Print the paper-style table (results dict or a ``results.json`` path) to stdout."""
    if not isinstance(results, dict):
        results = read_json(results)
    print(format_table(results))


def _verdicts(results: dict, s: str) -> list[str]:
    """Plain sentences stating what the numbers show, whatever they show."""
    base = _row(results, results.get("baseline"))
    ens = _row(results, results.get("ensemble"))
    dist = _row(results, results.get("distilled"))
    out = []
    if base and ens:
        bfa, efa = base["frame_acc"][s], ens["frame_acc"][s]
        bw, ew = base["wer"][s], ens["wer"][s]
        n = _ensemble_size(ens)
        if bfa is not None and efa is not None:
            if efa > bfa:
                out.append(f"The {n}-member ensemble beats the members' mean frame accuracy by "
                           f"{efa - bfa:+.2f} points ({efa:.2f}% vs {bfa:.2f}%).")
            else:
                out.append(f"**The {n}-member ensemble does NOT beat the members on frame accuracy** "
                           f"({efa:.2f}% vs a member mean of {bfa:.2f}%).")
        member_fa = [r["frame_acc"][s] for r in results["systems"]
                     if r["kind"] == "member" and r["frame_acc"].get(s) is not None]
        if efa is not None and member_fa and efa <= max(member_fa) and (bfa is None or efa > bfa):
            out.append(f"**The ensemble does NOT beat the best single member on frame accuracy** "
                       f"({efa:.2f}% vs {max(member_fa):.2f}%).")
        if bw is not None and ew is not None:
            if ew < bw:
                out.append(f"The ensemble lowers the WER from {bw:.2f}% (member mean) to {ew:.2f}%.")
            else:
                out.append(f"**The ensemble does NOT lower the WER** ({ew:.2f}% vs a member mean of {bw:.2f}%).")
    if base and dist:
        bfa, dfa = base["frame_acc"][s], dist["frame_acc"][s]
        if bfa is not None and dfa is not None:
            word = "above" if dfa > bfa else "NOT above"
            out.append(f"The distilled model's frame accuracy ({dfa:.2f}%) is {word} the member mean ({bfa:.2f}%).")
    g = results["gain_kept"].get(s, {})
    if g.get("frame_acc") is not None:
        out.append(f"The distilled model keeps {100 * g['frame_acc']:.0f}% of the ensemble's frame-accuracy gain "
                   f"(paper: more than 80%).")
    elif base and ens and dist:
        out.append("The share of the gain kept is undefined: the ensemble has no frame-accuracy gain to keep.")
    for sig in results["significance"]:
        if sig["set"] != s:
            continue
        if sig["ci_low"] <= 0.0 <= sig["ci_high"]:
            out.append(f"The WER difference {sig['b']} - {sig['a']} ({sig['delta']:+.2f}) is not significant "
                       f"at 95% (CI {sig['ci_low']:+.2f} .. {sig['ci_high']:+.2f} includes 0).")
    return out


def _ablation_md(results: dict) -> list[str]:
    rows = results.get("ablation") or []
    if not rows:
        return []
    sets = results["sets"]
    L = ["## Distillation ablation", "",
         "Each student variant (its own `conf/<variant>.yaml`), the temperature chosen on dev, frame accuracy / "
         "WER, and the share of the ensemble's frame-accuracy gain it keeps. Everything was chosen on dev; "
         "test is only reported.", "",
         "| Variant | What it does | T | " + " | ".join(f"{s} FA / WER (kept)" for s in sets) + " |",
         "|---|---|---|" + "---|" * len(sets)]
    for r in rows:
        cells = []
        for s in sets:
            k = r["gain_kept"].get(s)
            cells.append(f"{_f(r['frame_acc'].get(s))} / {_f(r['wer'].get(s))} "
                         f"({'n/a' if k is None else f'{100 * k:.0f}%'})")
        L.append(f"| {r['variant']} | {r['description']} | {r['temperature']:g} | " + " | ".join(cells) + " |")
    return L + [""]


def _diagnostics_md(results: dict) -> list[str]:
    d = results.get("diagnostics")
    if not d:
        return []
    L = ["## Distillation diagnostics (reported student's variant)", "",
         "On a fixed sample of training frames and on every dev frame: the ensemble's gain over its members "
         "(large on dev but small on training frames means the targets carry little there), and each "
         "student's accuracy, argmax agreement with the ensemble and KL(ensemble || student) at T = 1 "
         "(poor agreement on training frames means the student failed to fit).", "",
         "| Frames | member mean acc. | ensemble acc. | ensemble gain | student | acc. | agreement | KL |",
         "|---|---|---|---|---|---|---|---|"]
    for part in ("train", "dev"):
        p = d[part]
        for name, st in p["students"].items():
            L.append(f"| {part} ({p['frames']}) | {100 * p['member_mean_acc']:.2f} | {100 * p['ensemble_acc']:.2f} | "
                     f"{100 * p['ensemble_gain']:+.2f} | {name} | {100 * st['acc']:.2f} | "
                     f"{100 * st['agreement']:.2f} | {st['kl']:.4f} |")
    return L + [""]


def _header_md(results: dict, path: Path, command: str | None) -> list[str]:
    """Title, the command that made the file, the paper's figures, and which student is reported."""
    L: list[str] = [f"# Results: {results['corpus']}", ""]
    L.append(f"Made by `{command or 'asr report --exp-dir ' + str(path.parent)}` from the decode, distill "
             "and training outputs beside this file (numbers in `results.json`). Frame accuracy and WER in "
             "percent. Paper (Hinton et al. 2015, Table 1, test): baseline "
             f"{PAPER_TABLE1['baseline'][0]} / {PAPER_TABLE1['baseline'][1]}, 10x ensemble "
             f"{PAPER_TABLE1['ensemble'][0]} / {PAPER_TABLE1['ensemble'][1]}, distilled "
             f"{PAPER_TABLE1['distilled'][0]} / {PAPER_TABLE1['distilled'][1]}.")
    L.append("")
    if results.get("incomplete"):
        L += [f"**WARNING: incomplete member family; the baseline averages only what exists. Missing: "
              f"{'; '.join(results['incomplete'])}.**", ""]
    L.append(f"Reported distilled model: {results['distilled_choice_reason']}.")
    L.append("")
    return L


def _set_md(results: dict, s: str) -> list[str]:
    """One set's paper-style table, the share of the ensemble's gain kept, and the verdicts."""
    rows = _paper_rows(results, s)
    if not rows:
        return []
    L = [f"## {s}", "", "| System | Frame acc. (%) | WER (%) |", "|---|---|---|"]
    L += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    L.append("")
    g = results["gain_kept"].get(s, {})
    fa_kept = "n/a" if g.get("frame_acc") is None else f"{100 * g['frame_acc']:.0f}%"
    wer_kept = "n/a" if g.get("wer") is None else f"{100 * g['wer']:.0f}%"
    L.append(f"Share of the ensemble's gain kept by the distilled model, (distilled - baseline) / "
             f"(ensemble - baseline): frame accuracy {fa_kept}, WER {wer_kept}.")
    L.append("")
    L += [f"- {v}" for v in _verdicts(results, s)]
    L.append("")
    return L


def _significance_md(results: dict) -> list[str]:
    """The paired bootstrap table, and why its baseline is the median member rather than the mean."""
    if not results["significance"]:
        return []
    L = ["## Paired bootstrap (WER difference B - A, 95% CI)", "",
         f"Utterances resampled with replacement, {results['bootstrap']['num_samples']} samples, seed "
         f"{results['bootstrap']['seed']}. \"Baseline\" here is one real system: the member with the median "
         "WER on that set (lower median for an even count), because a paired test needs the same "
         "system's errors on every utterance; pooling members would test an average that no single model "
         "achieves. Negative delta: B has fewer errors.", "",
         "| Set | A | B | delta WER | 95% CI | p |", "|---|---|---|---|---|---|"]
    for sig in results["significance"]:
        L.append(f"| {sig['set']} | {sig['a']} | {sig['b']} | {sig['delta']:+.2f} | "
                 f"[{sig['ci_low']:+.2f}, {sig['ci_high']:+.2f}] | {sig['p_value']:.3f} |")
    L.append("")
    return L


def _all_systems_md(results: dict, sets: Sequence[str]) -> list[str]:
    """Every system on every set (the member mean with its standard deviation)."""
    L = ["## All systems", ""]
    head = "| System | Kind | Params | " + " | ".join(f"{s} FA | {s} WER" for s in sets) + " |"
    L += [head, "|" + "---|" * (3 + 2 * len(sets))]
    for r in results["systems"]:
        cells = []
        for s in sets:
            fa, wer = r["frame_acc"].get(s), r["wer"].get(s)
            if r["kind"] == "member-mean":
                cells += [f"{_f(fa)} ± {_f(r['frame_acc_std'][s])}", f"{_f(wer)} ± {_f(r['wer_std'][s])}"]
            else:
                cells += [_f(fa), _f(wer)]
        params = r.get("params")
        L.append(f"| {r['name']} | {r['kind']} | {params if params is not None else 'n/a'} | " + " | ".join(cells) + " |")
    L.append("")
    return L


def _settings_md(results: dict) -> list[str]:
    """The decoding weights tuned on dev and the distillation temperature chosen, so that every
    figure above can be traced to the settings that produced it."""
    L = ["## Chosen settings", ""]
    if results["tuning"]:
        L += ["Decoding weights tuned on dev by the decode stage (`decode/<system>/tune.json`):", "",
              "| System | acwt | LM weight | word insertion penalty |", "|---|---|---|---|"]
        for name, t in results["tuning"].items():
            L.append(f"| {name} | {_g(t.get('acwt'))} | {_g(t.get('lm_weight'))} | "
                     f"{_g(t.get('word_ins_penalty'))} |")
        L.append("")
    else:
        L += ["No `tune.json` found under `decode/`: the decode stage's defaults were used.", ""]
    dc = results.get("distill_choice")
    if dc:
        L.append(f"Distillation temperature: T = {dc.get('best_temperature')} "
                 f"(criterion: {dc.get('criterion', 'n/a')} on {dc.get('dev_set', 'n/a')}; "
                 f"hard-target weight {dc.get('hard_weight', 'n/a')}).")
        per_t = dc.get("per_temperature") or {}
        if per_t:
            L.append("")
            L += ["| T | dev frame acc. (%) |", "|---|---|"]
            L += [f"| {t} | {_f(_num(v))} |" for t, v in per_t.items()]
        L.append("")
    return L


def write_results_md(results: dict, path: str | os.PathLike, plots: Sequence[Path] = (),
                     command: str | None = None) -> Path:
    """Write RESULTS.md from a results dict (see :func:`build_results`): one section after another."""
    path = Path(path)
    sets = results["sets"]
    L = _header_md(results, path, command)
    for s in sets:
        L += _set_md(results, s)
    L += _significance_md(results)
    L += _ablation_md(results) + _diagnostics_md(results)
    L += _all_systems_md(results, sets)
    L += _settings_md(results)
    L += data_checks_md(results.get("data_checks"))
    if plots:
        L += ["## Plots", ""]
        L += [f"![{p.stem}](plots/{p.name})" for p in plots]
        L.append("")
    atomic_write_text(path, "\n".join(L))
    return path


# ---------------------------------------------------------------------------------------------
# Data checks (real speech)


def _reason_counts(path: Path, col: int = 1) -> dict[str, int]:
    """``{reason: count}`` of a tab-separated ``id<TAB>reason`` file (bad_utts.txt, failed.txt).

    Reasons are cut at the first ':' after the file name so that one cause counts once.
    """
    counts: dict[str, int] = {}
    if not path.is_file():
        return counts
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) <= col:
            continue
        reason = re.sub(r"^\S+\.(txt|flac|wav)(:\d+)?: ", "", parts[col].strip())[:80]
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def data_checks(exp_dir: str | os.PathLike) -> dict:
    """Per set: utterances kept and dropped (and why), OOV rates, alignment failures, silence share.

    Real speech fails in ways a synthetic corpus does not (words missing from CMUdict, long
    silences, transcripts that do not match the audio, which make alignment fail), and every one
    of them changes what the frame accuracies and WERs measure; so the report states them. Read
    from ``data/<set>/`` (manifest, oov.json, bad_utts.txt; a speaker split's source subset),
    ``feats/<set>/`` (bad_utts.txt), ``ali/<set>/`` (info.json, failed.txt) and ``lm/``.
    """
    exp_dir = Path(exp_dir)
    data = exp_dir / "data"
    sets = sorted(p.parent.name for p in data.glob("*/manifest.jsonl")) if data.is_dir() else []
    ppl = read_json(exp_dir / "lm" / "ppl.json") if (exp_dir / "lm" / "ppl.json").is_file() else {}
    out: dict[str, dict] = {}
    for s in sets:
        d = data / s
        row: dict[str, Any] = {"num_utts": sum(1 for line in open(d / "manifest.jsonl", encoding="utf-8") if line.strip())}
        done = read_json(d / ".done") if (d / ".done").is_file() else {}
        src = done.get("from") if isinstance(done, dict) else None
        if src:
            row["split_from"] = src
        dropped = {f"data preparation: {k}": v for k, v in _reason_counts(d / "bad_utts.txt").items()}
        if src:
            dropped.update({f"data preparation of {src}: {k}": v
                            for k, v in _reason_counts(data / src / "bad_utts.txt").items()})
        dropped.update({f"features: {k}": v for k, v in _reason_counts(exp_dir / "feats" / s / "bad_utts.txt").items()})
        dropped.update({f"alignment: {k}": v for k, v in _reason_counts(exp_dir / "ali" / s / "failed.txt").items()})
        row["dropped"] = dropped
        if (d / "oov.json").is_file():
            o = read_json(d / "oov.json")
            row["oov_rate_lexicon"] = 100 * o["oov_rate"]
            row["oov_utt_rate_lexicon"] = 100 * o["oov_utt_rate"]
        if s in ppl:
            row["oov_rate_lm"] = ppl[s].get("oov_rate")
            row["lm_ppl"] = ppl[s].get("ppl")
        ali = exp_dir / "ali" / s / "info.json"
        if ali.is_file():
            a = read_json(ali)
            row["ali_failed"] = a.get("num_failed")
            row["ali_utts"] = a.get("num_utts")
            row["silence_share"] = None if a.get("silence_share") is None else 100 * a["silence_share"]
        out[s] = row
    return out


def data_checks_md(checks: dict | None) -> list[str]:
    """The RESULTS.md section of :func:`data_checks` (empty without data)."""
    if not checks:
        return []
    L = ["## Data checks", "",
         "Utterances per set, words outside the lexicon (they map to `<UNK>`, spoken as SPN) and outside "
         "the LM, alignment failures (left out of training and frame accuracy), silence share of the "
         "frame labels.", "",
         "| Set | Utterances | OOV lexicon (% words / % utts) | OOV LM (%) | LM ppl | Alignment failures | "
         "Silence (% frames) | Dropped |",
         "|---|---|---|---|---|---|---|---|"]
    for s, r in checks.items():
        name = s + (f" (from {r['split_from']})" if r.get("split_from") else "")
        fails = "n/a" if r.get("ali_failed") is None else f"{r['ali_failed']} of {r.get('ali_utts')}"
        dropped = "; ".join(f"{k} ({v})" for k, v in r["dropped"].items()) or "none"
        L.append(f"| {name} | {r['num_utts']} | {_f(r.get('oov_rate_lexicon'))} / {_f(r.get('oov_utt_rate_lexicon'), 1)} | "
                 f"{_f(_num(r.get('oov_rate_lm')))} | {_f(_num(r.get('lm_ppl')), 1)} | {fails} | "
                 f"{_f(r.get('silence_share'), 1)} | {dropped} |")
    L.append("")
    return L


# ---------------------------------------------------------------------------------------------
# Plots


def _read_train_log(path: Path) -> dict[str, list[float]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "epoch" not in reader.fieldnames:
            raise ReportError(f"{path}: a train_log.csv needs an 'epoch' column")
        cols: dict[str, list[float]] = {k: [] for k in reader.fieldnames}
        for row in reader:
            for k in cols:
                v = _num(row.get(k))
                cols[k].append(float("nan") if v is None else v)
    return cols


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _metric_plot(plt: Any, results: dict, rows: list[dict], xs: list[float], xlabel: str, title: str,
                 path: Path, logx: bool) -> Path:
    """Frame accuracy and WER of ``rows`` against ``xs``, one line per set, the member mean dashed."""
    base = _row(results, results.get("baseline"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, ylab in zip(axes, ("frame_acc", "wer"), ("frame accuracy (%)", "WER (%)")):
        for s in results["sets"]:
            ys = [r[metric].get(s) for r in rows]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
            if base and base[metric].get(s) is not None:
                ax.axhline(base[metric][s], color=line.get_color(), linestyle="--", linewidth=0.8)
        if logx:
            ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (dashed: member mean)")
    out = _save(fig, path)
    plt.close(fig)
    return out


def _training_curves_plot(plt: Any, results: dict, exp_dir: Path, path: Path) -> Path | None:
    """Train and dev frame accuracy per epoch: members in grey, students in colour (None: no logs)."""
    logs = [(p.parent.name, p, "member") for p in sorted((exp_dir / "members").glob("*/train_log.csv"))]
    logs += [(p.parent.name, p, "student") for p in sorted((exp_dir / "distill").glob("*/train_log.csv"))]
    if not logs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, p, role in logs:
        cols = _read_train_log(p)
        style = dict(color="0.6", linewidth=0.8) if role == "member" else dict(linewidth=1.6)
        label = None if role == "member" else f"student {name}"
        for ax, keys in zip(axes, (("train_frame_acc", "train_acc"), ("dev_frame_acc", "dev_acc"))):
            key = next((k for k in keys if k in cols), None)
            if key is None:
                continue
            ys = cols[key]
            finite = [y for y in ys if not math.isnan(y)]
            if finite and max(finite) <= 1.0:          # the training loop logs fractions
                ys = [100.0 * y for y in ys]
            ax.plot(cols["epoch"], ys, label=label, **style)
    for ax, key in zip(axes, ("train frame accuracy (%)", "dev frame accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].plot([], [], color="0.6", label="members")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['corpus']}: training curves (grey: members)")
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_plots(results: dict, exp_dir: str | os.PathLike, plots_dir: str | os.PathLike | None = None) -> list[Path]:
    """PNG plots: metrics against ensemble size, against temperature, and training curves.

    A plot whose data does not exist yet (e.g. no distilled systems) is skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp_dir = Path(exp_dir)
    plots_dir = Path(plots_dir) if plots_dir else exp_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    systems = results["systems"]
    written: list[Path] = []
    ens = sorted((r for r in systems if r["kind"] == "ensemble"), key=_ensemble_size)
    if ens:
        written.append(_metric_plot(plt, results, ens, [_ensemble_size(r) for r in ens],
                                    "ensemble size k (first k members by seed)",
                                    f"{results['corpus']}: ensemble size", plots_dir / "ensemble_size.png", False))
    dist = sorted((r for r in systems if r["kind"] == "distilled"), key=lambda r: r["temperature"])
    if dist:
        written.append(_metric_plot(plt, results, dist, [r["temperature"] for r in dist],
                                    "distillation temperature T", f"{results['corpus']}: distilled students",
                                    plots_dir / "temperature.png", True))
    curves = _training_curves_plot(plt, results, exp_dir, plots_dir / "training_curves.png")
    if curves is not None:
        written.append(curves)
    return written


# ---------------------------------------------------------------------------------------------
# Entry points


def build_report(
    exp_dir: str | os.PathLike,
    corpus: str | None = None,
    sets: Sequence[str] | None = None,
    bootstrap_samples: int = 1000,
    command: str | None = None,
    students: Sequence[str] | None = None,
    allow_incomplete: bool = False,
) -> tuple[Path, Path]:
    """Write ``exp_dir/RESULTS.md``, ``exp_dir/results.json`` and ``exp_dir/plots/*.png``.

    Always rebuilt (cheap, and it must reflect whatever has been decoded so far).
    Returns ``(RESULTS.md path, results.json path)``.
    """
    exp_dir = Path(exp_dir)
    corpus = corpus or exp_dir.resolve().name
    sets = list(sets) if sets else discover_sets(exp_dir)
    if not sets:
        raise ReportError(f"{exp_dir}/decode: no decoded sets (no */*/wer.json)")
    if students is None:   # every student variant folder that exists: distill_* first (the paper's recipe), distill last
        students = sorted((p.name for p in exp_dir.glob("distill*") if (p / "choice.json").is_file()),
                          key=lambda n: (n == "distill", n))
    results = build_results(exp_dir, corpus, sets, bootstrap_samples=bootstrap_samples, students=students,
                            allow_incomplete=allow_incomplete)
    plots = write_plots(results, exp_dir)
    results["plots"] = [str(p.relative_to(exp_dir)) for p in plots]
    results["data_checks"] = data_checks(exp_dir)
    results["provenance"] = provenance()      # versions, threads, CPU, commit: what the figures depend on
    json_path = exp_dir / "results.json"
    atomic_write_json(json_path, results)
    md_path = write_results_md(results, exp_dir / "RESULTS.md", plots, command=command)
    log.info("wrote %s and %s", md_path, json_path)
    return md_path, json_path


def _cli(args: argparse.Namespace) -> int:
    cmd = f"asr report --exp-dir {args.exp_dir}" + (f" --corpus {args.corpus}" if args.corpus else "") + \
        (f" --sets {' '.join(args.sets)}" if args.sets else "")
    _, json_path = build_report(args.exp_dir, args.corpus, args.sets, args.bootstrap_samples, command=cmd,
                                students=args.students, allow_incomplete=args.allow_incomplete)
    if not args.quiet:
        print_table(json_path)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write RESULTS.md, results.json and plots for one corpus",
        description="Collect decode results into the paper-style table. "
                    "Example: asr report --exp-dir exp/mini",
    )
    p.add_argument("--exp-dir", required=True, help="exp/<corpus> directory")
    p.add_argument("--corpus", default=None, help="corpus name (default: the exp dir's name)")
    p.add_argument("--sets", nargs="+", default=None, help="sets to report (default: every decoded set)")
    p.add_argument("--bootstrap-samples", type=int, default=1000)
    p.add_argument("--students", nargs="+", default=None,
                   help="student variant folders for the ablation table, in order (default: every distill*/)")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="report a member family with missing results (listed in the table) instead of failing")
    p.set_defaults(func=_cli)
