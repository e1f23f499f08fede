import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.nio.file.StandardOpenOption;
import java.nio.file.attribute.PosixFilePermissions;
import java.util.List;

/** Drop records into pushdrop's inbox atomically: java Drop.java INBOX NAME JSON... */
public final class Drop {
    /** Writes one JSON object per line to inbox/name (name ends in .jsonl). */
    public static void drop(Path inbox, String name, List<String> jsonLines) throws Exception {
        Path tmp = Files.createTempFile(inbox, ".drop-", ".tmp"); // hidden: ignored by pushdrop
        try {
            byte[] bytes = (String.join("\n", jsonLines) + "\n").getBytes(StandardCharsets.UTF_8);
            try (FileChannel ch = FileChannel.open(tmp, StandardOpenOption.WRITE)) {
                ByteBuffer buf = ByteBuffer.wrap(bytes);
                while (buf.hasRemaining()) {
                    ch.write(buf);
                }
                ch.force(true); // on disk before it becomes visible
            }
            // createTempFile made it 600: let pushdrop's group read it.
            Files.setPosixFilePermissions(tmp, PosixFilePermissions.fromString("rw-r-----"));
            // rename(2); fails instead of copying across file systems.
            Files.move(tmp, inbox.resolve(name), StandardCopyOption.ATOMIC_MOVE);
        } finally {
            Files.deleteIfExists(tmp);
        }
    }

    public static void main(String[] args) throws Exception {
        drop(Path.of(args[0]), args[1], List.of(args).subList(2, args.length));
    }
}
