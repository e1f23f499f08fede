<?php
// Drop records into pushdrop's inbox atomically (PHP >= 8.1 for fsync).
function pushdrop_drop(string $inbox, string $name, array $records): void
{
    $tmp = tempnam($inbox, '.drop');            // ".dropXXXXXX" in the inbox: ignored by pushdrop
    if ($tmp === false || dirname($tmp) !== realpath($inbox)) {
        // tempnam falls back to the system temp dir when $inbox is not writable: a rename
        // from there would be a copy, not atomic.
        throw new RuntimeException("cannot create a temp file in $inbox");
    }
    try {
        $lines = '';
        foreach ($records as $r) {
            $lines .= json_encode($r, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR) . "\n";
        }
        $f = fopen($tmp, 'wb');
        if ($f === false || fwrite($f, $lines) !== strlen($lines) || !fsync($f) || !fclose($f)) {
            throw new RuntimeException("cannot write $tmp");
        }
        chmod($tmp, 0640);                        // tempnam made it 600: let pushdrop's group read it
        if (!rename($tmp, "$inbox/$name")) {      // rename(2) within one file system
            throw new RuntimeException("cannot rename $tmp");
        }
    } finally {
        if (file_exists($tmp)) {
            unlink($tmp);
        }
    }
}
