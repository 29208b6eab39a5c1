"""Context-dependent tied triphone states: tree statistics, questions, tree building, Kaldi format.

This is Kaldi's ``acc-tree-stats`` + ``cluster-phones`` / ``compile-questions`` + ``build-tree``
for a triphone system (context width N = 3, central position P = 1), written here because
kaldi-hmm-gmm does not expose tree building (DESIGN.md section 9):

1. **Statistics**: from a monophone alignment, per (left phone, central phone, right phone,
   pdf-class) the count, sum and sum of squares of the GMM's features; phones across word
   boundaries are context as in Kaldi, phone 0 stands for the utterance edges.
2. **Questions**: phone sets from a top-down binary clustering of the phones' statistics (pdf-class
   ``question_pdf_class`` only, as Kaldi's ``cluster-phones --pdf-class-list=1``): every set of that
   cluster tree is a question about the left and about the right phone. Questions on the pdf-class
   are ``{0}, {0, 1}, ...`` (Kaldi's ``compile-questions``), needed because each phone has one root
   shared by its HMM states.
3. **Tree**: one root per phone ("shared split"; silence and spoken noise are phones like the
   others, so they get their own roots), leaves split greedily by single-Gaussian log-likelihood
   gain (Kaldi's ``GaussClusterable`` objective with a variance floor) until ``num_leaves`` or a
   gain below ``split_thresh``; then leaves of one root are merged bottom-up while a merge loses
   less than ``merge_thresh`` (-1: the smallest split gain, as Kaldi's ``--cluster-thresh=-1``).
4. **Format**: Kaldi's binary ``ContextDependency`` (``TE`` on the central phone, ``SE`` splits,
   ``CE`` leaves); the ``tree`` file carries Kaldi's binary header and is readable by Kaldi's tools,
   and kaldi-hmm-gmm loads it through ``ContextDependency.__setstate__``.

Outputs (``tree/``): ``tree`` (Kaldi binary), ``treeacc.npz`` (the statistics), ``questions.txt``,
``info.json`` (leaves before and after merging, thresholds, likelihoods, seconds), ``config.yaml``.

Example::

    asr build-tree --ali-dir exp/mini/ali/train-clean --feats-dir exp/mini/feats/train-clean \\
        --lang-dir exp/mini/lang --mono-dir exp/mini/gmm_mono --out-dir exp/mini/tree
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import logging
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

import kaldi_hmm_gmm as khg  # noqa: I001  (must be imported before kaldifst)

from asr.config import add_config_args, config_from_args, write_config
from asr.io import atomic_path, atomic_write_json, atomic_write_text, is_done, mark_done

__all__ = [
    "TreeConfig",
    "TreeError",
    "TreeStats",
    "Leaf",
    "Split",
    "Tree",
    "gauss_objf",
    "split_gain",
    "phone_questions",
    "pdf_class_questions",
    "build_tree",
    "accumulate_tree_stats",
    "context_dependency_from_bytes",
    "make_tree",
    "load_tree",
    "add_cli",
]

log = logging.getLogger(__name__)

_LOG_2PI = math.log(2.0 * math.pi)
PDF_CLASS_KEY = -1        # Kaldi's kPdfClass
CONTEXT_WIDTH = 3         # N: left, central, right phone
CENTRAL_POSITION = 1      # P
_KEY_COLUMN = {0: 0, 1: 1, 2: 2, PDF_CLASS_KEY: 3}   # event key -> column of TreeStats.keys


class TreeError(ValueError):
    """Bad tree input (statistics, alignment, serialisation); the message names the file."""


@dataclass(frozen=True)
class TreeConfig:
    """Tree building settings (Kaldi ``build-tree`` / ``acc-tree-stats`` defaults where they exist)."""

    num_leaves: int = 300            # most leaves before merging (Kaldi --max-leaves)
    split_thresh: float = 300.0      # no split gains less than this (Kaldi --thresh)
    merge_thresh: float = -1.0       # merge leaves losing less than this; -1: smallest split gain; 0: none
    min_leaf_count: float = 20.0     # no split leaves a side with fewer frames
    var_floor: float = 0.01          # GaussClusterable variance floor (Kaldi acc-tree-stats --var-floor)
    question_pdf_class: int = 1      # phone clustering uses this pdf-class (Kaldi --pdf-class-list=1)

    def __post_init__(self) -> None:
        if self.num_leaves < 1:
            raise ValueError(f"TreeConfig.num_leaves must be >= 1, got {self.num_leaves}")
        if self.var_floor <= 0:
            raise ValueError(f"TreeConfig.var_floor must be > 0, got {self.var_floor}")
        if self.merge_thresh < 0 and self.merge_thresh != -1:
            raise ValueError(f"TreeConfig.merge_thresh must be >= 0 or -1, got {self.merge_thresh}")
        if self.min_leaf_count < 0:
            raise ValueError(f"TreeConfig.min_leaf_count must be >= 0, got {self.min_leaf_count}")


# --------------------------------------------------------------------------------------------
# Statistics and the single-Gaussian objective


@dataclass
class TreeStats:
    """Single-Gaussian statistics per context: ``keys`` int32 ``(n, 4)`` = (left, central, right,
    pdf-class), ``stats`` float64 ``(n, 1 + 2D)`` = (count, sum, sum of squares)."""

    keys: np.ndarray
    stats: np.ndarray

    def __post_init__(self) -> None:
        self.keys = np.asarray(self.keys, np.int32).reshape(-1, 4)
        self.stats = np.asarray(self.stats, np.float64)
        if self.stats.ndim != 2 or self.stats.shape[0] != self.keys.shape[0] or self.stats.shape[1] % 2 != 1:
            raise TreeError(f"tree stats: keys {self.keys.shape} and stats {self.stats.shape} do not match")

    @property
    def dim(self) -> int:
        return (self.stats.shape[1] - 1) // 2

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=self.keys, stats=self.stats)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TreeStats":
        p = Path(path)
        if not p.is_file():
            raise TreeError(f"tree statistics {p} do not exist (run build-tree)")
        with np.load(p, allow_pickle=False) as z:
            return cls(z["keys"], z["stats"])

    @classmethod
    def from_frames(cls, keys: np.ndarray, feats: np.ndarray) -> "TreeStats":
        """Sum per distinct key row: ``keys`` ``(T, 4)``, ``feats`` ``(T, D)``."""
        keys = np.asarray(keys, np.int64)
        x = np.asarray(feats, np.float64)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        order = np.argsort(inv, kind="stable")
        starts = np.searchsorted(inv[order], np.arange(len(uniq)))
        rows = np.concatenate([np.ones((len(x), 1)), x, x * x], axis=1)[order]
        return cls(uniq, np.add.reduceat(rows, starts, axis=0))

    @classmethod
    def merge(cls, parts: Sequence["TreeStats"]) -> "TreeStats":
        keys = np.concatenate([p.keys for p in parts])
        stats = np.concatenate([p.stats for p in parts])
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        out = np.zeros((len(uniq), stats.shape[1]))
        np.add.at(out, inv, stats)
        return cls(uniq, out)


def gauss_objf(stats: np.ndarray, var_floor: float) -> np.ndarray:
    """Kaldi's ``GaussClusterable::Objf``: the log-likelihood of the data under its own ML diagonal
    Gaussian (variances floored), for every row of ``stats`` ``(..., 1 + 2D)``; 0 where count <= 0."""
    stats = np.asarray(stats, np.float64)
    d = (stats.shape[-1] - 1) // 2
    n = stats[..., :1]
    ok = n[..., 0] > 0
    safe = np.where(n > 0, n, 1.0)
    mean = stats[..., 1:1 + d] / safe
    var = stats[..., 1 + d:] / safe - mean * mean
    fv = np.maximum(var, var_floor)
    per_frame = -0.5 * (var / fv).sum(-1) - 0.5 * (np.log(fv).sum(-1) + _LOG_2PI * d)
    return np.where(ok, per_frame * n[..., 0], 0.0)


def split_gain(yes: np.ndarray, no: np.ndarray, var_floor: float) -> float:
    """Log-likelihood gain of modelling two sets by a Gaussian each instead of one."""
    return float(gauss_objf(yes, var_floor) + gauss_objf(no, var_floor) - gauss_objf(yes + no, var_floor))


# --------------------------------------------------------------------------------------------
# Questions


def pdf_class_questions(max_pdf_classes: int) -> list[frozenset[int]]:
    """``{0}, {0, 1}, ..., {0 .. n-2}`` (Kaldi's ``compile-questions`` for the pdf-class key)."""
    return [frozenset(range(i + 1)) for i in range(max_pdf_classes - 1)]


def _two_way_split(members: list[int], stats: dict[int, np.ndarray], var_floor: float) -> tuple[list[int], list[int]]:
    """Split a phone set in two for the best single-Gaussian likelihood: seed with the phone whose
    removal gains most, then move phones one at a time while a move improves the total (each move
    strictly improves it, so this ends)."""
    tot = sum(stats[p] for p in members)
    gains = [split_gain(stats[p], tot - stats[p], var_floor) for p in members]
    b = {members[int(np.argmax(gains))]}
    a = set(members) - b
    sa, sb = tot - stats[next(iter(b))], stats[next(iter(b))].copy()
    for _ in range(100):
        moved = False
        for p in members:
            src, dst = (a, b) if p in a else (b, a)
            if len(src) == 1:
                continue
            s_src, s_dst = (sa, sb) if src is a else (sb, sa)
            before = gauss_objf(s_src, var_floor) + gauss_objf(s_dst, var_floor)
            after = gauss_objf(s_src - stats[p], var_floor) + gauss_objf(s_dst + stats[p], var_floor)
            if after > before + 1e-9:
                src.remove(p)
                dst.add(p)
                if src is a:
                    sa, sb = sa - stats[p], sb + stats[p]
                else:
                    sb, sa = sb - stats[p], sa + stats[p]
                moved = True
        if not moved:
            break
    return sorted(a), sorted(b)


def phone_questions(phone_stats: dict[int, np.ndarray], var_floor: float) -> list[frozenset[int]]:
    """Every set of a top-down binary clustering of the phones (Kaldi's ``cluster-phones``), the
    singletons included and the set of all phones left out (it separates nothing)."""
    phones = sorted(p for p, s in phone_stats.items() if s[0] > 0)
    out: list[frozenset[int]] = []
    todo = [phones] if len(phones) > 1 else []
    while todo:
        a, b = _two_way_split(todo.pop(), phone_stats, var_floor)
        for part in (a, b):
            out.append(frozenset(part))
            if len(part) > 1:
                todo.append(part)
    return sorted(set(out), key=lambda q: (len(q), sorted(q)))


# --------------------------------------------------------------------------------------------
# The tree


@dataclass(frozen=True)
class Leaf:
    pdf: int


@dataclass(frozen=True)
class Split:
    """``key``: 0 left phone, 2 right phone, -1 pdf-class; values in ``yes`` go to ``yes_child``."""

    key: int
    yes: tuple[int, ...]
    yes_child: "Node"
    no_child: "Node"


Node = Union[Leaf, Split]


@dataclass(frozen=True)
class Tree:
    """A triphone tree: ``roots[central phone]``; every (left, right, pdf-class) reaches a leaf."""

    roots: dict[int, Node]

    def compute(self, left: int, central: int, right: int, pdf_class: int) -> int:
        node = self.roots.get(central)
        if node is None:
            raise TreeError(f"phone {central} has no root in the tree")
        event = {0: left, 2: right, PDF_CLASS_KEY: pdf_class, 1: central}
        while isinstance(node, Split):
            node = node.yes_child if event[node.key] in node.yes else node.no_child
        return node.pdf

    def leaves(self) -> list[int]:
        out = []
        for root in self.roots.values():
            stack = [root]
            while stack:
                n = stack.pop()
                if isinstance(n, Leaf):
                    out.append(n.pdf)
                else:
                    stack += [n.no_child, n.yes_child]
        return out

    @property
    def num_pdfs(self) -> int:
        return max(self.leaves()) + 1

    # Kaldi binary format ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Kaldi's binary ``ContextDependency`` serialisation (without the ``\\0B`` file header)."""
        size = max(self.roots) + 1
        table = b"".join(_write_node(self.roots[p]) if p in self.roots else _tok("NULL") for p in range(size))
        to_pdf = _tok("TE") + _i32(CENTRAL_POSITION) + b"\xfc" + struct.pack("<I", size) + _tok("(") + table + _tok(")")
        return (_tok("ContextDependency") + _i32(CONTEXT_WIDTH) + _i32(CENTRAL_POSITION) + _tok("ToPdf") + to_pdf
                + _tok("EndContextDependency"))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Tree":
        r = _Reader(data[2:] if data[:2] == b"\x00B" else data)
        r.expect("ContextDependency")
        n, p = r.int32(), r.int32()
        if (n, p) != (CONTEXT_WIDTH, CENTRAL_POSITION):
            raise TreeError(f"tree has N={n}, P={p}; only triphone trees (N=3, P=1) are supported")
        r.expect("ToPdf")
        r.expect("TE")
        if r.int32() != CENTRAL_POSITION:
            raise TreeError("tree root is not a table on the central phone")
        size = r.uint32()
        r.expect("(")
        roots = {}
        for phone in range(size):
            node = r.node()
            if node is not None:
                roots[phone] = node
        r.expect(")")
        r.expect("EndContextDependency")
        return cls(roots)

    def to_context_dependency(self) -> khg.ContextDependency:
        return context_dependency_from_bytes(self.to_bytes())


def context_dependency_from_bytes(data: bytes) -> khg.ContextDependency:
    """A kaldi-hmm-gmm ``ContextDependency`` from Kaldi's binary serialisation (header optional)."""
    if data[:2] == b"\x00B":
        data = data[2:]
    cd = khg.ContextDependency.__new__(khg.ContextDependency)
    cd.__setstate__(([b - 256 if b > 127 else b for b in data],))
    return cd


def _tok(s: str) -> bytes:
    return s.encode() + b" "


def _i32(v: int) -> bytes:
    return b"\x04" + struct.pack("<i", int(v))


def _write_node(node: Node) -> bytes:
    if isinstance(node, Leaf):
        return _tok("CE") + _i32(node.pdf)
    yes = sorted(node.yes)
    return (_tok("SE") + _i32(node.key) + b"\x04" + struct.pack("<i", len(yes)) + struct.pack(f"<{len(yes)}i", *yes)
            + _tok("{") + _write_node(node.yes_child) + _write_node(node.no_child) + _tok("}"))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def token(self) -> str:
        end = self.data.find(b" ", self.pos)
        if end < 0:
            raise TreeError(f"tree: truncated at byte {self.pos}")
        tok, self.pos = self.data[self.pos:end].decode("ascii", "replace"), end + 1
        return tok

    def expect(self, tok: str) -> None:
        got = self.token()
        if got != tok:
            raise TreeError(f"tree: expected {tok!r} at byte {self.pos}, got {got!r}")

    def _fixed(self, size_byte: int, fmt: str) -> int:
        if self.data[self.pos] != size_byte:
            raise TreeError(f"tree: bad integer size byte {self.data[self.pos]} at byte {self.pos}")
        (v,) = struct.unpack_from(fmt, self.data, self.pos + 1)
        self.pos += 5
        return v

    def int32(self) -> int:
        return self._fixed(4, "<i")

    def uint32(self) -> int:
        return self._fixed(0xFC, "<I")

    def node(self) -> Node | None:
        tok = self.token()
        if tok == "NULL":
            return None
        if tok == "CE":
            return Leaf(self.int32())
        if tok == "SE":
            key = self.int32()
            n = self.int32()
            yes = struct.unpack_from(f"<{n}i", self.data, self.pos)
            self.pos += 4 * n
            self.expect("{")
            y, no = self.node(), self.node()
            self.expect("}")
            if y is None or no is None:
                raise TreeError("tree: a split with a missing child")
            return Split(key, tuple(yes), y, no)
        raise TreeError(f"tree: unsupported event map {tok!r} (only SE / CE below the root table)")


# --------------------------------------------------------------------------------------------
# Building


class _Grow:
    """A leaf while the tree grows: its context rows and its best split."""

    __slots__ = ("idx", "stats", "best", "split")

    def __init__(self, idx: np.ndarray, stats: np.ndarray) -> None:
        self.idx, self.stats = idx, stats
        self.best: tuple[float, int, frozenset[int]] | None = None
        self.split: tuple[int, frozenset[int], "_Grow", "_Grow"] | None = None


def _value_stats(vals: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    order = np.argsort(vals, kind="stable")
    uniq, starts = np.unique(vals[order], return_index=True)
    out = np.zeros((size, rows.shape[1]))
    out[uniq] = np.add.reduceat(rows[order], starts, axis=0)
    return out


def _best_split(leaf: _Grow, st: TreeStats, questions: dict[int, tuple[list[frozenset[int]], np.ndarray]],
                cfg: TreeConfig) -> None:
    """Kaldi's ``FindBestSplitForKey`` over every key: the question with the largest gain."""
    rows = st.stats[leaf.idx]
    tot = leaf.stats
    base = gauss_objf(tot, cfg.var_floor)
    best = None
    for key, (qs, mat) in questions.items():
        if not qs:
            continue
        vals = st.keys[leaf.idx, _KEY_COLUMN[key]]
        if vals.max() >= mat.shape[1]:
            raise TreeError(f"context value {int(vals.max())} beyond the question universe of key {key}")
        yes = mat @ _value_stats(vals, rows, mat.shape[1])     # (Q, 1 + 2D)
        no = tot - yes
        ok = (yes[:, 0] >= max(cfg.min_leaf_count, 1e-9)) & (no[:, 0] >= max(cfg.min_leaf_count, 1e-9))
        if not ok.any():
            continue
        gain = np.where(ok, gauss_objf(yes, cfg.var_floor) + gauss_objf(no, cfg.var_floor) - base, -np.inf)
        q = int(np.argmax(gain))
        if best is None or gain[q] > best[0]:
            best = (float(gain[q]), key, qs[q])
    leaf.best = best


def _merge_leaves(leaves: list[_Grow], thresh: float, var_floor: float) -> tuple[list[int], int]:
    """Bottom-up clustering of one root's leaves (Kaldi ``ClusterEventMapRestrictedByMap``): merge the
    pair losing least while that loss is below ``thresh``. Returns a cluster index per leaf."""
    clusters = {i: leaves[i].stats.copy() for i in range(len(leaves))}
    assign = list(range(len(leaves)))
    merges = 0
    while len(clusters) > 1:
        ids = sorted(clusters)
        s = np.stack([clusters[i] for i in ids])
        obj = gauss_objf(s, var_floor)
        pair = gauss_objf(s[:, None, :] + s[None, :, :], var_floor)
        loss = obj[:, None] + obj[None, :] - pair
        loss[np.tril_indices(len(ids))] = np.inf
        a, b = np.unravel_index(int(np.argmin(loss)), loss.shape)
        if not loss[a, b] < thresh:
            break
        ka, kb = ids[a], ids[b]
        clusters[ka] = clusters[ka] + clusters.pop(kb)
        assign = [ka if c == kb else c for c in assign]
        merges += 1
    return assign, merges


_Questions = dict[int, tuple[list[frozenset[int]], np.ndarray]]


def _question_matrix(qs: list[frozenset[int]], size: int) -> np.ndarray:
    """``(Q, size)`` 0/1 rows, one a question, so one product sums the statistics of every 'yes' set."""
    m = np.zeros((len(qs), size))
    for i, q in enumerate(qs):
        m[i, sorted(q)] = 1.0
    return m


def _make_questions(stats: TreeStats, phones: list[int], num_pdf_classes: dict[int, int],
                    cfg: TreeConfig) -> tuple[list[frozenset[int]], list[frozenset[int]], _Questions]:
    """Phone questions clustered from each phone's statistics (of pdf class ``question_pdf_class``) and
    pdf-class questions; returns both lists and the questions asked of each key, with their matrices."""
    universe = max(phones) + 1
    qc = cfg.question_pdf_class
    phone_stats: dict[int, np.ndarray] = {}
    for p in phones:
        m = (stats.keys[:, 1] == p) & (stats.keys[:, 3] == min(qc, num_pdf_classes[p] - 1))
        phone_stats[p] = stats.stats[m].sum(0) if m.any() else np.zeros(stats.stats.shape[1])
    pq = phone_questions(phone_stats, cfg.var_floor)
    cq = pdf_class_questions(max(num_pdf_classes[p] for p in phones))
    questions = {0: (pq, _question_matrix(pq, universe)), 2: (pq, _question_matrix(pq, universe)),
                 PDF_CLASS_KEY: (cq, _question_matrix(cq, max(cq[-1]) + 2 if cq else 1))}
    return pq, cq, questions


class _Frontier:
    """The leaves that can still split, best gain first (ties in creation order, so growth is
    deterministic)."""

    def __init__(self, stats: TreeStats, questions: _Questions, cfg: TreeConfig) -> None:
        self.stats, self.questions, self.cfg = stats, questions, cfg
        self.heap: list = []
        self.tie = itertools.count()

    def add(self, leaf: _Grow) -> None:
        _best_split(leaf, self.stats, self.questions, self.cfg)
        if leaf.best is not None:
            heapq.heappush(self.heap, (-leaf.best[0], next(self.tie), leaf))


def _grow(stats: TreeStats, phones: list[int], questions: _Questions,
          cfg: TreeConfig) -> tuple[dict[int, _Grow], int, list[float]]:
    """One root per phone, then greedy splits (largest gain first) until ``num_leaves`` or the gain
    falls below ``split_thresh``. Returns the roots, the leaf count and the gain of every split."""
    roots: dict[int, _Grow] = {}
    frontier = _Frontier(stats, questions, cfg)
    for p in phones:
        idx = np.nonzero(stats.keys[:, 1] == p)[0]
        leaf = _Grow(idx, stats.stats[idx].sum(0) if idx.size else np.zeros(stats.stats.shape[1]))
        roots[p] = leaf
        if idx.size:
            frontier.add(leaf)
    num_leaves, gains = len(roots), []
    while frontier.heap and num_leaves < cfg.num_leaves:
        neg, _, leaf = heapq.heappop(frontier.heap)
        if -neg < cfg.split_thresh:
            break
        _, key, q = leaf.best
        inq = np.isin(stats.keys[leaf.idx, _KEY_COLUMN[key]], sorted(q))
        kids = []
        for mask in (inq, ~inq):
            idx = leaf.idx[mask]
            kid = _Grow(idx, stats.stats[idx].sum(0))
            frontier.add(kid)
            kids.append(kid)
        leaf.split = (key, q, kids[0], kids[1])
        gains.append(-neg)
        num_leaves += 1
    return roots, num_leaves, gains


def _assign_pdfs(roots: dict[int, _Grow], phones: list[int], thresh: float,
                 var_floor: float) -> tuple[dict[int, Node], int, int]:
    """Merge leaves within each root (when ``thresh`` > 0), then number the clusters as pdfs in phone
    order, tree order. Returns the frozen roots, the number of pdfs and of merges."""
    merged = 0
    next_pdf = 0
    tree_roots: dict[int, Node] = {}
    for p in phones:
        grown = _grown_leaves(roots[p])
        assign, m = _merge_leaves(grown, thresh, var_floor) if thresh > 0 else (list(range(len(grown))), 0)
        merged += m
        pdf_of: dict[int, int] = {}
        for c in assign:
            if c not in pdf_of:
                pdf_of[c] = next_pdf
                next_pdf += 1
        leaf_pdf = {id(g): pdf_of[c] for g, c in zip(grown, assign)}
        tree_roots[p] = _freeze(roots[p], leaf_pdf)
    return tree_roots, next_pdf, merged


def build_tree(stats: TreeStats, phones: Sequence[int], num_pdf_classes: dict[int, int],
               cfg: TreeConfig = TreeConfig()) -> tuple[Tree, dict]:
    """Grow the tree (greedy splits up to ``num_leaves``), then merge leaves within each root.

    ``phones``: every phone that needs a root (a phone without statistics gets one leaf);
    ``num_pdf_classes``: pdf classes per phone (for the pdf-class questions). Returns the tree and
    what happened (questions, leaves, gains) for ``info.json``.
    """
    phones = sorted(int(p) for p in phones)
    universe = max(phones) + 1
    if stats.keys.size and int(stats.keys[:, :3].max()) >= universe:
        raise TreeError(f"tree statistics mention phone {int(stats.keys[:, :3].max())}, the lang has {universe - 1}")
    pq, cq, questions = _make_questions(stats, phones, num_pdf_classes, cfg)
    t0 = time.time()
    roots, num_leaves, gains = _grow(stats, phones, questions, cfg)
    split_seconds = time.time() - t0
    thresh = cfg.merge_thresh if cfg.merge_thresh >= 0 else (min(gains) if gains else 0.0)
    tree_roots, num_pdfs, merged = _assign_pdfs(roots, phones, thresh, cfg.var_floor)

    total = gauss_objf(stats.stats.sum(0), cfg.var_floor) if stats.stats.size else 0.0
    leaf_objf = sum(float(gauss_objf(g.stats, cfg.var_floor)) for p in phones for g in _grown_leaves(roots[p]))
    info = {
        "num_questions": {"phone": len(pq), "pdf_class": len(cq)},
        "num_leaves_split": num_leaves, "num_leaves": num_pdfs, "num_merged": merged,
        "merge_thresh": thresh, "smallest_split_gain": min(gains) if gains else None,
        "objf_per_frame_root": round(float(total / max(stats.stats[:, 0].sum(), 1.0)), 4),
        "objf_gain_per_frame": round(float(sum(gains) / max(stats.stats[:, 0].sum(), 1.0)), 4),
        "leaf_objf": leaf_objf, "split_seconds": round(split_seconds, 3),
    }
    info["_phone_questions"] = [sorted(q) for q in pq]
    return Tree(tree_roots), info


def _grown_leaves(root: _Grow) -> list[_Grow]:
    out, stack = [], [root]
    while stack:
        n = stack.pop()
        if n.split is None:
            out.append(n)
        else:
            stack += [n.split[3], n.split[2]]
    return out


def _freeze(node: _Grow, leaf_pdf: dict[int, int]) -> Node:
    if node.split is None:
        return Leaf(leaf_pdf[id(node)])
    key, q, yes, no = node.split
    return Split(key, tuple(sorted(q)), _freeze(yes, leaf_pdf), _freeze(no, leaf_pdf))


# --------------------------------------------------------------------------------------------
# Statistics from a monophone alignment


def phone_instances(phones: np.ndarray, pdf_classes: np.ndarray) -> np.ndarray:
    """Index of the phone instance of every frame: a new one starts where the phone changes or the
    HMM re-enters pdf-class 0 (every topology starts there and never returns to it)."""
    t = len(phones)
    if t == 0:
        return np.zeros(0, np.int64)
    new = np.ones(t, bool)
    new[1:] = (phones[1:] != phones[:-1]) | ((pdf_classes[1:] == 0) & (pdf_classes[:-1] != 0))
    return np.cumsum(new) - 1


def context_keys(phones: np.ndarray, pdf_classes: np.ndarray) -> np.ndarray:
    """``(T, 4)`` (left, central, right, pdf-class) per frame, phone 0 beyond the utterance edges."""
    inst = phone_instances(phones, pdf_classes)
    if len(inst) == 0:
        return np.zeros((0, 4), np.int64)
    starts = np.concatenate([[0], np.nonzero(np.diff(inst))[0] + 1])
    seq = np.concatenate([[0], phones[starts], [0]])
    return np.stack([seq[inst], phones, seq[inst + 2], pdf_classes], axis=1).astype(np.int64)


def mono_pdf_maps(lang) -> tuple[np.ndarray, np.ndarray]:
    """(phone, pdf-class) of every monophone pdf of ``lang`` (an ``asr.lang.Lang``)."""
    ctx, topo = lang.ctx_dep(), lang.topology()
    pdf_phone = np.full(lang.num_pdfs, -1, np.int64)
    pdf_class = np.full(lang.num_pdfs, -1, np.int64)
    for p in lang.real_phone_ids:
        for c in range(topo.num_pdf_classes(p)):
            ok, pdf = ctx.compute([p], c)
            if not ok:
                raise TreeError(f"{lang.dir}: monophone tree has no pdf for phone {p}, class {c}")
            pdf_phone[pdf], pdf_class[pdf] = p, c
    return pdf_phone, pdf_class


def accumulate_tree_stats(ali_dir: str | os.PathLike, feats_dir: str | os.PathLike, lang_dir: str | os.PathLike,
                          mono_dir: str | os.PathLike, chunk_frames: int = 200_000) -> tuple[TreeStats, dict]:
    """Kaldi's ``acc-tree-stats`` on the labels of ``ali_dir`` (monophone pdfs) with the features of
    the monophone GMM of ``mono_dir``. Utterances left out of the alignment are skipped."""
    from asr.features import FeatureStore
    from asr.cepstra import GmmFeatureSource
    from asr.gmm_model import GmmModel, _model_config, _model_path
    from asr.labels import LabelStore
    from asr.lang import load_lang

    lang = load_lang(lang_dir)
    model = GmmModel.load(_model_path(mono_dir))
    if model.tree is not None:
        raise TreeError(f"{mono_dir}: tree statistics need a monophone alignment model")
    labels = LabelStore(ali_dir)
    if labels.num_pdfs != lang.num_pdfs:
        raise TreeError(f"{ali_dir}: {labels.num_pdfs} pdfs, the monophone lang {lang_dir} has {lang.num_pdfs}")
    store = FeatureStore(feats_dir)
    labels.check_matches(store)
    source = GmmFeatureSource(feats_dir, _model_config(model))
    pdf_phone, pdf_class = mono_pdf_maps(lang)
    parts, keys_buf, feats_buf, n_buf = [], [], [], 0
    used = frames = 0
    for u in store.ids:
        lab = labels.utt(store, u)
        if lab.size == 0 or np.any(lab < 0):
            continue
        keys_buf.append(context_keys(pdf_phone[lab], pdf_class[lab]))
        feats_buf.append(source.feats(u))
        n_buf += lab.size
        used += 1
        frames += lab.size
        if n_buf >= chunk_frames:
            parts.append(TreeStats.from_frames(np.concatenate(keys_buf), np.concatenate(feats_buf)))
            keys_buf, feats_buf, n_buf = [], [], 0
    if keys_buf:
        parts.append(TreeStats.from_frames(np.concatenate(keys_buf), np.concatenate(feats_buf)))
    if not parts:
        raise TreeError(f"{ali_dir}: no aligned utterance to accumulate tree statistics from")
    st = TreeStats.merge(parts) if len(parts) > 1 else parts[0]
    return st, {"num_utts": used, "num_frames": frames, "num_contexts": int(st.keys.shape[0])}


# --------------------------------------------------------------------------------------------
# The build-tree step


def make_tree(ali_dir: str | os.PathLike, feats_dir: str | os.PathLike, lang_dir: str | os.PathLike,
              mono_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: TreeConfig = TreeConfig()) -> Path:
    """Accumulate tree statistics, build and write the tree (``out_dir/tree``)."""
    from asr.lang import load_lang

    ali_dir, feats_dir, lang_dir, out_dir = Path(ali_dir), Path(feats_dir), Path(lang_dir), Path(out_dir)
    for d, what in ((ali_dir, "alignment"), (feats_dir, "features"), (lang_dir, "lang")):
        if not is_done(d):
            raise TreeError(f"{what} directory {d} is not complete")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".done").unlink(missing_ok=True)
    lang = load_lang(lang_dir)
    t0 = time.time()
    st, acc_info = accumulate_tree_stats(ali_dir, feats_dir, lang_dir, mono_dir)
    acc_seconds = time.time() - t0
    st.save(out_dir / "treeacc.npz")
    topo = lang.topology()
    ncls = {p: int(topo.num_pdf_classes(p)) for p in lang.real_phone_ids}
    t1 = time.time()
    tree, info = build_tree(st, lang.real_phone_ids, ncls, cfg)
    build_seconds = time.time() - t1
    with atomic_path(out_dir / "tree") as tmp:
        tmp.write_bytes(b"\x00B" + tree.to_bytes())
    ctx = load_tree(out_dir)                                    # check that Kaldi accepts it
    tm = khg.TransitionModel(ctx, topo)
    qs = info.pop("_phone_questions")
    atomic_write_text(out_dir / "questions.txt",
                      "".join(" ".join(lang.phones[p] for p in q) + "\n" for q in qs))
    info.update(acc_info, num_pdfs=int(ctx.num_pdfs), num_transition_ids=int(tm.num_transition_ids),
                acc_seconds=round(acc_seconds, 3), build_seconds=round(build_seconds, 3))
    atomic_write_json(out_dir / "info.json", info)
    write_config(cfg, out_dir)
    mark_done(out_dir)
    log.info("tree: %d leaves (%d before merging) from %d contexts of %d frames; stats %.1fs, build %.1fs",
             info["num_leaves"], info["num_leaves_split"], acc_info["num_contexts"], acc_info["num_frames"],
             acc_seconds, build_seconds)
    return out_dir


def load_tree(tree_dir_or_file: str | os.PathLike) -> khg.ContextDependency:
    """The ``ContextDependency`` of a ``build-tree`` directory (or a Kaldi binary ``tree`` file)."""
    p = Path(tree_dir_or_file)
    if p.is_dir():
        p = p / "tree"
    if not p.is_file():
        raise TreeError(f"tree {p} does not exist (run build-tree)")
    data = p.read_bytes()
    Tree.from_bytes(data)                                       # a clear error before Kaldi sees it
    return context_dependency_from_bytes(data)


# --------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build-tree", help="triphone decision tree from a monophone alignment (Kaldi build-tree)")
    p.add_argument("--ali-dir", required=True, help="monophone labels of the training set (ali/<train>)")
    p.add_argument("--feats-dir", required=True, help="features of the training set")
    p.add_argument("--lang-dir", required=True)
    p.add_argument("--mono-dir", required=True, help="the monophone GMM (its feature settings)")
    p.add_argument("--out-dir", required=True)
    add_config_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    make_tree(args.ali_dir, args.feats_dir, args.lang_dir, args.mono_dir, args.out_dir,
              config_from_args(TreeConfig, args))
    return 0

