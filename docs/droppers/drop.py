"""Drop records into pushdrop's inbox atomically: python3 drop.py INBOX NAME < records.jsonl"""
import json
import os
import sys
import tempfile


def drop(inbox, name, records):
    """Writes `records` (dicts) as JSON lines to `inbox/name` (name ends in .jsonl)."""
    fd, tmp = tempfile.mkstemp(dir=inbox, prefix=".drop.", suffix=".tmp")  # ignored by pushdrop
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before it becomes visible
        os.chmod(tmp, 0o640)  # mkstemp made it 600: let pushdrop's group read it
        os.rename(tmp, os.path.join(inbox, name))  # atomic within one file system
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _unique_keys(pairs):
    """A JSON object whose keys are unique: json.loads would keep the last of two silently,
    and pushdrop rejects duplicate keys (a typo must not pass)."""
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python3 drop.py INBOX NAME.jsonl < records.jsonl")
    records = []
    for n, line in enumerate(sys.stdin, 1):
        line = line.lstrip("\ufeff") if n == 1 else line  # a byte-order mark, as pushdrop takes
        if line.strip():
            try:
                records.append(json.loads(line, object_pairs_hook=_unique_keys))
            except ValueError as e:  # nothing is dropped
                sys.exit(f"drop.py: stdin line {n}: {e}")
    drop(sys.argv[1], sys.argv[2], records)
