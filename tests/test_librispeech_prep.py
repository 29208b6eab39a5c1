"""LibriSpeech layout parsing, bad-input handling and the resumable, md5-checked downloader."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asr.manifest import read_manifest
from conftest import make_librispeech, write_flac
from data_prep.librispeech import (
    CorpusError,
    DownloadError,
    download_file,
    download_librispeech,
    find_subsets,
    prepare_librispeech,
    read_speakers,
)


# ------------------------------------------------------------------------------------------
# Layout parsing


def test_find_subsets_accepts_both_roots(tmp_path):
    make_librispeech(tmp_path / "LibriSpeech", "dev-clean")
    make_librispeech(tmp_path / "LibriSpeech", "train-clean")
    (tmp_path / "LibriSpeech" / "not-a-subset").mkdir()
    assert find_subsets(tmp_path / "LibriSpeech") == ["dev-clean", "train-clean"]
    assert find_subsets(tmp_path) == ["dev-clean", "train-clean"]


def test_read_speakers_keeps_pipes_in_names(tiny_librispeech):
    spk = read_speakers(tiny_librispeech / "SPEAKERS.TXT")
    assert set(spk) == {"19", "26"}
    assert spk["26"]["name"] == "|CBW|Simon"
    assert spk["19"]["sex"] == "F" and spk["19"]["minutes"] == pytest.approx(0.05)


def test_prepare_writes_sorted_manifest(tiny_librispeech, tmp_path):
    out = tmp_path / "data"
    res = prepare_librispeech(tiny_librispeech, ["dev-clean"], out)
    assert res == {"dev-clean": out / "dev-clean" / "manifest.jsonl"}
    utts = read_manifest(res["dev-clean"])
    assert [u.id for u in utts] == sorted(u.id for u in utts)
    assert len(utts) == 6
    u = {x.id: x for x in utts}["19-198-0002"]
    assert (u.speaker, u.chapter, u.text) == ("19", "198", "IT'S A TEST")
    assert Path(u.audio).is_absolute() and Path(u.audio).is_file()
    assert u.num_samples == sf.info(u.audio).frames == int(0.5 * 16000)
    assert u.duration == pytest.approx(0.5)
    assert json.loads((out / "dev-clean" / "speakers.json").read_text())["26"]["sex"] == "M"
    assert (out / "dev-clean" / ".done").is_file()
    assert not (out / "dev-clean" / "bad_utts.txt").exists()


def test_rerun_skips_done_subset_and_nj_gives_same_manifest(tiny_librispeech, tmp_path, monkeypatch):
    out1 = tmp_path / "a"
    prepare_librispeech(tiny_librispeech, None, out1, nj=1)
    out2 = tmp_path / "b"
    prepare_librispeech(tiny_librispeech, None, out2, nj=2)
    assert (out1 / "dev-clean" / "manifest.jsonl").read_text() == (out2 / "dev-clean" / "manifest.jsonl").read_text()
    import data_prep.librispeech as lp

    def boom(*a, **k):
        raise AssertionError("a finished subset was processed again")

    monkeypatch.setattr(lp, "scan_subset", boom)
    prepare_librispeech(tiny_librispeech, ["dev-clean"], out1)  # .done: nothing is redone


# ------------------------------------------------------------------------------------------
# Bad input: each case stops with an error naming the file, or is listed with skip_bad


def _corrupt(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for i in range(60, len(data), 7):  # keep the header, garble the frames
        data[i] ^= 0x5A
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _zero(p: Path) -> None:
    p.write_bytes(b"")


def _wrong_rate(p: Path) -> None:
    write_flac(p, seconds=0.3, sample_rate=8000)


def _set_line(corpus: Path, text: str) -> None:
    t = corpus / "dev-clean" / "19" / "198" / "19-198.trans.txt"
    lines = t.read_text(encoding="utf-8").splitlines()
    lines[1] = f"19-198-0001 {text}"
    t.write_text("\n".join(lines) + "\n", encoding="utf-8")


BAD_CASES = {
    "corrupt": (lambda c: _corrupt(c / "dev-clean/19/198/19-198-0001.flac"), "19-198-0001", "corrupt"),
    "truncated": (lambda c: _truncate(c / "dev-clean/19/198/19-198-0001.flac"), "19-198-0001", ""),
    "zero-length": (lambda c: _zero(c / "dev-clean/19/198/19-198-0001.flac"), "19-198-0001", "zero-length"),
    "wrong-rate": (lambda c: _wrong_rate(c / "dev-clean/19/198/19-198-0001.flac"), "19-198-0001", "8000 Hz"),
    "line-without-audio": (lambda c: (c / "dev-clean/19/198/19-198-0001.flac").unlink(), "19-198-0001",
                           "no audio file"),
    "audio-without-line": (lambda c: write_flac(c / "dev-clean/19/198/19-198-0009.flac"), "19-198-0009",
                           "no transcript line"),
    "non-ascii": (lambda c: _set_line(c, "THE QUICK BRÖWN FOX"), "19-198-0001", "non-ASCII"),
    "lower-case": (lambda c: _set_line(c, "the quick brown fox"), "19-198-0001", "lower-case"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_stops_with_named_error(tiny_librispeech, tmp_path, case):
    damage, name, problem = BAD_CASES[case]
    damage(tiny_librispeech)
    out = tmp_path / "data"
    with pytest.raises(CorpusError) as err:
        prepare_librispeech(tiny_librispeech, ["dev-clean"], out)
    msg = str(err.value)
    assert name in msg and problem in msg
    assert not (out / "dev-clean" / "manifest.jsonl").exists()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_skip_bad_lists_problem_and_keeps_the_rest(tiny_librispeech, tmp_path, case):
    damage, name, problem = BAD_CASES[case]
    damage(tiny_librispeech)
    out = tmp_path / "data"
    prepare_librispeech(tiny_librispeech, ["dev-clean"], out, skip_bad=True)
    bad = (out / "dev-clean" / "bad_utts.txt").read_text().splitlines()
    assert len(bad) == 1 and bad[0].split("\t")[0] == name and problem in bad[0]
    ids = {u.id for u in read_manifest(out / "dev-clean" / "manifest.jsonl")}
    assert name not in ids
    assert len(ids) == 6 - (case != "audio-without-line")


def test_truncated_flac_is_reported_as_truncated_or_corrupt(tiny_librispeech, tmp_path):
    _truncate(tiny_librispeech / "dev-clean/26/495/26-495-0002.flac")
    with pytest.raises(CorpusError, match=r"26-495-0002.*(truncated|corrupt|unreadable)"):
        prepare_librispeech(tiny_librispeech, ["dev-clean"], tmp_path / "data")


def test_failed_rerun_keeps_previous_outputs(tiny_librispeech, tmp_path):
    out = tmp_path / "data"
    prepare_librispeech(tiny_librispeech, ["dev-clean"], out)
    before = (out / "dev-clean" / "manifest.jsonl").read_bytes()
    _corrupt(tiny_librispeech / "dev-clean/26/495/26-495-0000.flac")
    (out / "dev-clean" / ".done").unlink()  # force the stage to run again
    with pytest.raises(CorpusError, match="26-495-0000"):
        prepare_librispeech(tiny_librispeech, ["dev-clean"], out, nj=2)
    assert (out / "dev-clean" / "manifest.jsonl").read_bytes() == before
    assert not list((out / "dev-clean").glob(".*.tmp"))


# ------------------------------------------------------------------------------------------
# Downloader against a local HTTP server


class _Server:
    """Serves ``files`` with Range support; ``cut_after`` bytes then drops the connection once."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_after: int | None = None
        self.ranges: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_error(416)
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after is not None:
                    self.wfile.write(body[: outer.cut_after])
                    outer.cut_after = None
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


def _fake_archive(tmp_path: Path) -> bytes:
    src = make_librispeech(tmp_path / "src" / "LibriSpeech", "dev-clean")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "dev-clean", arcname="LibriSpeech/dev-clean")
        tar.add(src / "SPEAKERS.TXT", arcname="LibriSpeech/SPEAKERS.TXT")
    return buf.getvalue()


def test_interrupted_download_resumes_with_range(tmp_path):
    data = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))
    md5 = hashlib.md5(data).hexdigest()
    with _Server({"x.bin": data}) as srv:
        srv.cut_after = 120_000
        dest = tmp_path / "dl" / "x.bin"
        with pytest.raises(DownloadError, match="interrupted"):
            download_file(f"{srv.url}/x.bin", dest, md5=md5, retries=0, progress=False)
        part = dest.with_name("x.bin.part")
        assert not dest.exists() and part.stat().st_size == 120_000
        download_file(f"{srv.url}/x.bin", dest, md5=md5, retries=0, progress=False)
        assert srv.ranges[-1] == "bytes=120000-"
        assert dest.read_bytes() == data and not part.exists()
        # Automatic retry within one call resumes too.
        srv.cut_after = 50_000
        dest2 = tmp_path / "dl" / "y.bin"
        download_file(f"{srv.url}/x.bin", dest2, md5=md5, retries=2, progress=False, backoff_s=0)
        assert dest2.read_bytes() == data and srv.ranges[-1] == "bytes=50000-"


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    data = b"not the real archive" * 100
    with _Server({"dev-clean.tar.gz": data}) as srv:
        with pytest.raises(DownloadError, match=r"dev-clean\.tar\.gz: md5 .* does not match the expected "
                                                r"42e2234ba48799c1f50f24a7926300a1"):
            download_librispeech(tmp_path, ["dev-clean"], with_lm=False, base_url=srv.url)
        assert not (tmp_path / "dev-clean.tar.gz").exists()
        assert not (tmp_path / "dev-clean.tar.gz.part").exists()


def test_download_librispeech_unpacks_and_prepares(tmp_path):
    archive = _fake_archive(tmp_path)
    lexicon = b"HELLO HH AH0 L OW1\nWORLD W ER1 L D\n"
    sums = f"{hashlib.md5(lexicon).hexdigest()}  librispeech-lexicon.txt\n".encode()
    files = {"dev-clean.tar.gz": archive, "md5sum.txt": sums, "librispeech-lexicon.txt": lexicon}
    target = tmp_path / "target"
    with _Server(files) as srv:
        srv.cut_after = len(archive) // 2
        md5s = {"dev-clean": hashlib.md5(archive).hexdigest()}
        with pytest.raises(DownloadError):
            download_librispeech(target, ["dev-clean"], base_url=srv.url, lm_base_url=srv.url, md5s=md5s,
                                 lm_files=("librispeech-lexicon.txt",), retries=0)
        corpus = download_librispeech(target, ["dev-clean"], base_url=srv.url, lm_base_url=srv.url, md5s=md5s,
                                      lm_files=("librispeech-lexicon.txt",), retries=0)
        assert srv.ranges.count(f"bytes={len(archive) // 2}-") == 1
        assert (target / "lm" / "librispeech-lexicon.txt").read_bytes() == lexicon
        # A second call finds everything done and fetches no archive.
        n = len(srv.ranges)
        download_librispeech(target, ["dev-clean"], base_url=srv.url, lm_base_url=srv.url, md5s=md5s,
                             lm_files=("librispeech-lexicon.txt",), retries=0)
        assert len(srv.ranges) == n + 1  # only md5sum.txt again
        # A corrupted LM file on the server is caught by md5sum.txt.
        files["librispeech-vocab.txt"] = b"HELLO\n"
        srv.files["md5sum.txt"] = sums + b"00000000000000000000000000000000  librispeech-vocab.txt\n"
        with pytest.raises(DownloadError, match="librispeech-vocab.txt: md5"):
            download_librispeech(target, ["dev-clean"], base_url=srv.url, lm_base_url=srv.url, md5s=md5s,
                                 lm_files=("librispeech-lexicon.txt", "librispeech-vocab.txt"), retries=0)
    assert corpus == target / "LibriSpeech"
    assert find_subsets(target) == ["dev-clean"]
    utts = read_manifest(prepare_librispeech(target, None, tmp_path / "data")["dev-clean"])
    assert len(utts) == 6


def test_combined_training_set(tmp_path):
    """`--subsets a+b` prepares both subsets and writes their union as one set (460 h / 960 h)."""
    from asr.cli import main
    from asr.manifest import read_manifest

    corpus = tmp_path / "LibriSpeech"
    make_librispeech(corpus, "train-clean-100", {"19": {"198": ["HELLO WORLD", "ONE TWO"]}})
    make_librispeech(corpus, "train-clean-360", {"26": {"495": ["THREE FOUR"]}})
    out = tmp_path / "data"
    rc = main(["prepare-librispeech", "--corpus-dir", str(corpus), "--out-dir", str(out),
               "--subsets", "train-clean-100+train-clean-360"])
    assert rc == 0
    both = read_manifest(out / "train-clean-100+train-clean-360" / "manifest.jsonl")
    parts = read_manifest(out / "train-clean-100" / "manifest.jsonl") + \
        read_manifest(out / "train-clean-360" / "manifest.jsonl")
    assert sorted(u.id for u in both) == sorted(u.id for u in parts) and len(both) == 3


def test_mini_librispeech_subsets_come_from_resource_31_with_published_md5(tmp_path):
    # The fixture archive is not the real train-clean-5: served where resource 31 lives, it must be
    # fetched from there (not from resource 12) and refused by the published md5.
    from data_prep.librispeech import MINI_LIBRISPEECH_MD5

    archive = _fake_archive(tmp_path)
    with _Server({"31/train-clean-5.tar.gz": archive}) as srv:
        with pytest.raises(DownloadError, match=MINI_LIBRISPEECH_MD5["train-clean-5"]):
            download_librispeech(tmp_path / "t", ["train-clean-5"], with_lm=False, base_url=f"{srv.url}/12",
                                 mini_base_url=f"{srv.url}/31", retries=0)
        assert srv.ranges, "nothing was requested from resource 31"
    assert not (tmp_path / "t" / "train-clean-5.tar.gz").exists()
    assert set(MINI_LIBRISPEECH_MD5) == {"train-clean-5", "dev-clean-2"}
