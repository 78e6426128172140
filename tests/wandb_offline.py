"""Read a wandb offline run folder back (tests): its ``run-<id>.wandb`` transaction log.

The file is wandb's record log: the header ``:W&B`` + magic ``0xBEE1`` + version byte, then
LevelDB-log framing (32 KiB blocks; each chunk a 7-byte header: CRC, little-endian length,
type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4; the CRC is zlib's CRC-32 of the type byte and the
payload) around serialized ``wandb_internal_pb2.Record``s. wandb 0.31 ships no Python reader (its
Go core reads these), so the framing is read here, strictly (a bad CRC or a cut-off record is an
error), and each record decoded with wandb's own protobuf classes. A run whose log has no run or
no exit record is an error too: wandb has not finished writing it.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
CHUNK_HEADER = 7
FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)


@dataclass
class OfflineRun:
    folder: Path
    run_id: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> {key: value}


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:len(FILE_HEADER)] == FILE_HEADER, data[:8]
    pos, out, pending = len(FILE_HEADER), [], b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if (crc, length, kind) == (0, 0, 0):  # zero padding
            pos += CHUNK_HEADER
            continue
        end = pos + CHUNK_HEADER + length
        assert end <= len(data) and crc == zlib.crc32(data[pos + CHUNK_HEADER - 1:end]), f"{path}: bad chunk at byte {pos}"
        pending += data[pos + CHUNK_HEADER:end]
        pos = end
        if kind in (1, 4):  # FULL or LAST
            out.append(pending)
            pending = b""
    assert pos == len(data) and not pending, f"{path}: cut off at byte {pos} of {len(data)}"
    return out


def read_offline_run(folder: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(folder).glob("run-*.wandb")
    run = OfflineRun(Path(folder))
    kinds = set()
    for raw in records(log):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "run":
            run.run_id, run.name, run.tags = record.run.run_id, record.run.display_name, list(record.run.tags)
            run.config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = int(items.pop("_step"))
            run.history[step] = {k: v for k, v in items.items() if not k.startswith("_")}
    assert {"run", "exit"} <= kinds, f"{log}: no run or no exit record (records: {sorted(map(str, kinds))}); wandb has not finished it"
    return run


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under ``wandb_dir/wandb``, oldest first."""
    return [read_offline_run(f) for f in sorted(Path(wandb_dir, "wandb").glob("offline-run-*"))]
