#!/bin/sh
# Usage: drop.sh INBOX NAME < records     (NAME ends in .json or .jsonl)
# Writes stdin under a hidden temp name inside the inbox (same file system, ignored by
# pushdrop), flushes it to disk, makes it readable by pushdrop's group, then renames it.
set -eu
inbox=$1 name=$2
tmp=$(mktemp "$inbox/.drop.XXXXXX")        # dotfile: pushdrop ignores it
trap 'rm -f "$tmp"' EXIT
cat >"$tmp"
sync "$tmp"                                # coreutils >= 8.24; drop it if losing the file on power loss is fine
chmod 640 "$tmp"                           # mktemp made it 600: let pushdrop's group read it
mv -T "$tmp" "$inbox/$name"                # rename(2): the file appears whole, or not at all
trap - EXIT
