"""The corpus build's SentencePiece step is not silent: heartbeat lines with elapsed time, MB, rate and ETA."""

import re
import time

import numpy as np

from engram_jax.data import prepare, progress


def test_heartbeat_lines_count_elapsed_and_eta():
  lines = []
  with progress.Heartbeat(lines.append, "job", size_mb=4.0, expected_s=2.0, every=0.05):
    time.sleep(0.32)
  beats, done = lines[:-1], lines[-1]
  assert 3 <= len(beats) <= 7, lines
  assert all(re.fullmatch(r"job \| 4\.0 MB \| 0m00s elapsed \| ETA ~0m0[12]s \(planned 2\.00 MB/s\)", b) for b in beats)
  rate = float(re.fullmatch(r"job done: 4\.0 MB in 0m00s \((\d+\.\d+) MB/s\)", done).group(1))
  assert 4.0 / 0.6 < rate < 4.0 / 0.3  # measured, about 4 MB / 0.32 s
  late = progress.Heartbeat(lines.append, "job", size_mb=1.0, expected_s=5.0)
  assert "ETA: any moment" in late.line(7.0) and "ETA ~1m00s" in progress.Heartbeat(
      lines.append, "job", size_mb=1.0, expected_s=65.0).line(5.0)


def test_corpus_build_logs_sentencepiece_progress(tmp_path, monkeypatch):
  monkeypatch.setattr(progress, "EVERY_S", 0.02)
  rng = np.random.default_rng(0)
  words = [f"w{i}x{j}" for i in range(300) for j in range(3)]
  docs = [" ".join(rng.choice(words, size=int(rng.integers(30, 120)))) + "." for _ in range(1500)]
  lines = []
  prepare.build_corpus(tmp_path / "c", {"toy": docs}, {"toy": {"license": "test"}}, vocab_size=600,
                       num_train_shards=2, log=lines.append)
  beats = [x for x in lines if x.startswith("corpus: SentencePiece 600-piece unigram | ")]
  assert beats and all("elapsed" in x and "ETA" in x and "MB/s" in x for x in beats), lines
  assert any(re.match(r"corpus: SentencePiece 600-piece unigram done: \d+\.\d MB in \dm\d\ds", x) for x in lines)
