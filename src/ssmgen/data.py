"""Reading a prepared dataset: the manifest, memory-mapped token splits, random training crops,
streams of consecutive crops (`CropStreams`) and evaluation chunks.

Alignment, shared by training and evaluation: a chunk's inputs are its tokens shifted right by one,
with the silence token 128 as the first input; targets are the tokens themselves. Crops never span
two source files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ssmgen.errors import UserError
from ssmgen.tokens import SILENCE_TOKEN

SPLITS = ("train", "val", "test")
FORMAT = "ssmgen-dataset"  # a dataset's manifest.json says so
FORMAT_VERSION = 1


def is_dataset(folder: str | Path) -> bool:
    """Whether `folder` holds a manifest.json of an ssmgen dataset."""
    try:
        m = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT


@dataclass(frozen=True)
class Segment:
    """A contiguous run of one source file's tokens inside a split array."""

    path: str
    offset: int
    length: int


class Dataset:
    """A folder written by `ssmgen prep`: `manifest.json` and one uint8 `.npy` array per split."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not self.root.is_dir():
            raise UserError(f"{self.root}: no such dataset folder (make one with `ssmgen prep`)")
        if not manifest_path.is_file():
            raise UserError(f"{self.root}: not an ssmgen dataset (no manifest.json; "
                            "make one with `ssmgen prep`)")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{manifest_path}: unreadable manifest ({e})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise UserError(f"{manifest_path}: not an ssmgen dataset manifest")
        _check_manifest(self.manifest, manifest_path)
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def rate(self) -> int:
        return int(self.manifest["rate"])

    def data_format(self) -> dict:
        """What a checkpoint must remember to read and write audio as this dataset did."""
        m = self.manifest
        return {"rate": int(m["rate"]), "encoding": m["encoding"], "bits": int(m["bits"]),
                "normalization": m["normalization"]}

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens, memory-mapped (uint8, 1-D)."""
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
        if split not in self._arrays:
            info = self.manifest["splits"].get(split)
            if info is None:
                raise UserError(f"{self.root}: the manifest has no {split} split")
            path = self.root / info["file"]
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: cannot read split '{split}' ({e})") from None
            if array.dtype != np.uint8 or array.ndim != 1 or len(array) != info["samples"]:
                raise UserError(f"{path}: holds {array.dtype} {array.shape}, where the manifest "
                                f"says {info['samples']} uint8 tokens; prepare the dataset again")
            end = max((s.offset + s.length for s in self.segments(split)), default=0)
            if end > len(array):
                raise UserError(f"{self.root / 'manifest.json'}: its {split} files reach past "
                                f"the end of {path.name}; prepare the dataset again")
            self._arrays[split] = array
        return self._arrays[split]

    def segments(self, split: str) -> list[Segment]:
        """Each source file's run of tokens within the split (by-time splits give one per part)."""
        out = []
        for f in self.manifest["files"]:
            for seg in f.get("segments") or [f]:
                if seg.get("split") == split and seg.get("length", 0) > 0:
                    out.append(Segment(f["path"], int(seg["offset"]), int(seg["length"])))
        return sorted(out, key=lambda s: s.offset)

    # --- training -------------------------------------------------------------------------------
    def check_trainable(self, sample_len: int) -> None:
        """Raise UserError now if training crops of `sample_len` cannot be drawn."""
        segs = self.segments("train")
        if not segs:
            raise UserError(f"{self.root}: the train split is empty")
        longest = max(s.length for s in segs)
        if longest < sample_len:
            raise UserError(f"{self.root}: no training file is as long as one training chunk "
                            f"({sample_len} samples = {sample_len / self.rate:.2f} s; longest "
                            f"{longest / self.rate:.2f} s): lower --sample-len")

    def crop_segments(self, length: int, split: str = "train") -> list[Segment]:
        """The split's files that hold a whole crop of `length`."""
        segs = [s for s in self.segments(split) if s.length >= length]
        if not segs:
            raise UserError(f"{self.root}: no {split} file holds {length} samples")
        return segs

    # --- evaluation -------------------------------------------------------------------------------
    def file_tokens(self, split: str, max_samples: int | None = None) -> Iterator[np.ndarray]:
        """Each file's tokens in the split (memory-mapped views), in order: what an evaluation
        of the split reads. With `max_samples`, a prefix of each file, the budget shared out
        evenly over the files (`fair_shares`), so a capped validation hears every file from its
        start rather than the first files alone."""
        segs = self.segments(split)
        tokens = self.tokens(split)
        takes = ([s.length for s in segs] if max_samples is None
                 else fair_shares([s.length for s in segs], max_samples))
        for seg, take in zip(segs, takes):
            if take > 0:
                yield tokens[seg.offset: seg.offset + take]

    def split_samples(self, split: str) -> int:
        return sum(s.length for s in self.segments(split))


def fair_shares(lengths: Sequence[int], budget: int) -> list[int]:
    """How many leading positions of each file a `budget` buys, shared out evenly (max-min
    fair): a file shorter than its share gives it all, the rest goes to the longer ones. The
    shares sum to min(budget, sum(lengths))."""
    shares = [0] * len(lengths)
    left = max(0, int(budget))
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for k, i in enumerate(order):
        shares[i] = min(int(lengths[i]), left // (len(order) - k))
        left -= shares[i]
    return shares


def _draw_crops(segs: list[Segment], n: int, length: int,
                rng: np.random.Generator) -> list[tuple[int, int]]:
    """`n` (segment index, offset) pairs, uniform over every position where a whole crop of
    `length` fits inside one file."""
    starts = np.array([s.length - length + 1 for s in segs], dtype=np.float64)
    which = rng.choice(len(segs), size=n, p=starts / starts.sum())
    return [(int(i), segs[i].offset + int(rng.integers(0, segs[i].length - length + 1)))
            for i in which]


class CropStreams:
    """Training crops that follow each batch row through one file: row b reads up to `crops`
    consecutive crops of a file (an episode), the model's state carried from each to the next
    (truncated backpropagation through time), then starts afresh at a new random position. A
    file's end also ends an episode. The first episodes are staggered, (b + 1) * crops // batch
    crops long, so rows do not all restart at the same step. With crops = 1 every crop is a fresh
    draw, uniform over every position where a whole crop fits inside one file (the paper's way).

    The cursors are plain data (`state_dict`), so a checkpoint resumes the streams exactly; the
    draws of step k come from the generator the caller seeds for step k."""

    def __init__(self, batch: int, crops: int) -> None:
        self.crops = crops
        self.segment = [-1] * batch  # -1: no episode yet
        self.offset = [0] * batch  # where the row's next crop starts (in the split array)
        self.left = [max(1, (b + 1) * crops // batch) for b in range(batch)]

    def next(self, dataset: Dataset, length: int, rng: np.random.Generator,
             split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, targets, fresh): int64 (batch, length) crops, and a bool (batch,) mask of the
        rows whose episode starts here (their state starts from zero and their first input is
        silence; a carried row's first input is the sample before its crop)."""
        segs = dataset.crop_segments(length, split)
        tokens = dataset.tokens(split)
        batch = len(self.segment)
        fresh = np.array([not self._continues(b, segs, length) for b in range(batch)])
        drawn = iter(_draw_crops(segs, int(fresh.sum()), length, rng))
        targets = np.empty((batch, length), dtype=np.int64)
        inputs = np.empty_like(targets)
        for b in range(batch):
            if fresh[b]:
                if self.segment[b] >= 0 or self.left[b] <= 0:  # not a row's staggered first
                    self.left[b] = self.crops
                self.segment[b], self.offset[b] = next(drawn)
            off = self.offset[b]
            targets[b] = tokens[off:off + length]
            inputs[b, 1:] = targets[b, :-1]
            inputs[b, 0] = SILENCE_TOKEN if fresh[b] else tokens[off - 1]
            self.offset[b] += length
            self.left[b] -= 1
        return inputs, targets, fresh

    def _continues(self, b: int, segs: list[Segment], length: int) -> bool:
        i = self.segment[b]
        return (self.left[b] > 0 and 0 <= i < len(segs) and self.offset[b] > segs[i].offset
                and self.offset[b] + length <= segs[i].offset + segs[i].length)

    def state_dict(self) -> dict:
        return {"segment": list(self.segment), "offset": list(self.offset),
                "left": list(self.left)}

    def load_state_dict(self, d: dict) -> None:
        """Cursors saved by `state_dict` for the same batch (a changed dataset only makes rows
        start afresh: `next` checks every cursor against the files)."""
        if len(d["segment"]) != len(self.segment):
            raise ValueError(f"cursors for {len(d['segment'])} rows, not {len(self.segment)}")
        self.segment, self.offset, self.left = ([int(v) for v in d[k]]
                                                for k in ("segment", "offset", "left"))


def _check_manifest(m: dict, path: Path) -> None:
    """What reading a dataset relies on, checked once: one line naming the manifest otherwise."""
    from ssmgen.audio import ENCODINGS, NORMALIZATIONS

    def bad(what: str) -> UserError:
        return UserError(f"{path}: damaged manifest ({what}); prepare the dataset again")

    rate = m.get("rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1000 <= rate <= 384000:
        raise bad(f"rate {rate!r}")
    if m.get("encoding") not in ENCODINGS:
        raise bad(f"encoding {m.get('encoding')!r}")
    if m.get("normalization") not in NORMALIZATIONS or m.get("bits") != 8:
        raise bad("normalization or bits")
    splits, files = m.get("splits"), m.get("files")
    if not isinstance(splits, dict) or not isinstance(files, list):
        raise bad("no splits or files")
    for name, info in splits.items():
        if name not in SPLITS or not isinstance(info, dict):
            raise bad(f"split {name!r}")
        file = info.get("file")
        if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
            raise bad(f"split file {file!r}")  # a plain name inside the dataset, nothing else
        if not _count(info.get("samples")):
            raise bad(f"{name} samples {info.get('samples')!r}")
    for f in files:
        segs = f.get("segments") or [f] if isinstance(f, dict) else [None]
        for seg in segs:
            if not isinstance(seg, dict) or not (_count(seg.get("offset")) and
                                                 _count(seg.get("length"))):
                raise bad("a file entry without offset and length")


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def token_chunks(tokens: np.ndarray, length: int,
                 streamed: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One file's tokens as consecutive (inputs, targets) int64 (1, n) chunks of `length` (the
    last one shorter), each aligned as a training crop (`shift_inputs`): silence first. With
    `streamed`, only the file's first chunk starts with silence; the others start with the sample
    before them, as one read of the whole file would (the model's state then carries across)."""
    prev = SILENCE_TOKEN
    for start in range(0, len(tokens), length):
        t = np.asarray(tokens[start: start + length], dtype=np.int64)
        inputs = shift_inputs(t[None])
        if streamed:
            inputs[0, 0] = prev
            prev = int(t[-1])
        yield inputs, t[None]


def shift_inputs(targets: np.ndarray) -> np.ndarray:
    """Inputs for next-token prediction: targets shifted right by one, silence first."""
    inputs = np.empty_like(targets)
    inputs[..., 0] = SILENCE_TOKEN
    inputs[..., 1:] = targets[..., :-1]
    return inputs
