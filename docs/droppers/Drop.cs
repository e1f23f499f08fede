// Drop records into pushdrop's inbox atomically (.NET 7+ for File.SetUnixFileMode).
using System;
using System.Collections.Generic;
using System.IO;
using System.Text;

public static class PushdropDrop
{
    /// Writes one JSON object per line to inbox/name (name ends in .jsonl).
    public static void Drop(string inbox, string name, IEnumerable<string> jsonLines)
    {
        var tmp = Path.Combine(inbox, $".drop-{Guid.NewGuid():N}.tmp"); // hidden: ignored by pushdrop
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write))
            using (var w = new StreamWriter(fs, new UTF8Encoding(false)))
            {
                foreach (var line in jsonLines) w.Write(line + "\n");
                w.Flush();
                fs.Flush(flushToDisk: true); // on disk before it becomes visible
            }
            File.SetUnixFileMode(tmp, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead);
            // Same directory, so a rename: the file appears whole. Throws if the name exists.
            File.Move(tmp, Path.Combine(inbox, name));
        }
        finally
        {
            if (File.Exists(tmp)) File.Delete(tmp);
        }
    }
}
