//! Receipts survive the real binary's stops (SPEC 4.4): a notification the database calls
//! finished has its receipt after a SIGTERM, and after a kill -9 once the daemon started
//! again; temporary receipt files a kill left behind are removed at start.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use common::inbox::{Env, token, wait_for};
use common::ops::{Spawned, pushdrop_cmd, spawn_logged};
use common::world::{World, notification_to};
use pushdrop::simulator::SimOptions;

fn spawn(env: &Env, log: &Path) -> Spawned {
    let mut cmd = pushdrop_cmd(&env.config_path);
    cmd.arg("run");
    spawn_logged(&mut cmd, log)
}

fn signal(child: &Spawned, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Waits for the child to exit, at most `limit`.
fn wait_exit(child: &mut Spawned, limit: Duration) -> ExitStatus {
    let mut child: Child = child.take();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pushdrop did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` notifications `r0`…, one token each.
fn notifications(n: u64) -> String {
    (0..n)
        .map(|i| {
            notification_to(
                &format!("r{i}"),
                &format!(r#"{{"tokens":["{}"]}}"#, token(i)),
                "",
            ) + "\n"
        })
        .collect()
}

fn receipts_dir(env: &Env) -> PathBuf {
    env.dir.path().join("var/receipts")
}

/// Ids of the notifications whose deliveries are all final, per the database.
fn finished_ids(env: &Env) -> Vec<String> {
    env.texts(
        "SELECT n.ext_id FROM notifications n JOIN notification_status s ON s.id = n.id
         WHERE s.finished_at IS NOT NULL ORDER BY n.id",
    )
}

/// The ids that have a receipt file.
fn receipt_ids(env: &Env) -> HashSet<String> {
    match std::fs::read_dir(receipts_dir(env)) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_suffix(".json")?;
                (!id.starts_with('.')).then(|| id.to_string())
            })
            .collect(),
        Err(_) => HashSet::new(),
    }
}

/// Finished notifications without a receipt (each receipt found is checked to parse and
/// to count one delivery).
fn missing_receipts(env: &Env) -> Vec<String> {
    let have = receipt_ids(env);
    let finished = finished_ids(env);
    for id in finished.iter().filter(|id| have.contains(*id)) {
        let r = common::world::receipt(env, id);
        assert_eq!(r["id"], id.as_str());
        let total: i64 = r["counts"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_i64().unwrap())
            .sum();
        assert_eq!(total, 1, "{id}: {r}");
    }
    finished
        .into_iter()
        .filter(|id| !have.contains(id))
        .collect()
}

/// Lines of the log that name `event`.
fn lines_of(log: &Path, event: &str) -> Vec<String> {
    let needle = format!("event=\"{event}\"");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// The ids of the `notification_finished` lines of a log that name a receipt.
fn finished_lines(log: &Path) -> HashSet<String> {
    lines_of(log, "notification_finished")
        .iter()
        .filter(|l| l.contains("receipt="))
        .filter_map(|l| {
            let rest = &l[l.find(" id=\"")? + 5..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

/// A numeric field of a text log line.
fn field(line: &str, name: &str) -> u64 {
    let rest = &line[line.find(&format!(" {name}=")).expect(name) + name.len() + 2..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn world(extra: &str) -> World {
    World::new(
        SimOptions {
            latency: Duration::from_millis(100),
            ..SimOptions::default()
        },
        &format!(
            "[sender]\nmax_in_flight = 500\nshutdown_grace_ms = 5000\n\n[receipts]\ndir = \"../var/receipts\"\n{extra}"
        ),
    )
}

/// SIGTERM while notifications finish by the hundred: exit 0, and every notification the
/// database calls finished has its receipt and its `notification_finished` line, without a
/// restart. (Receipts are written after the commit that finishes their notifications; the
/// stop used to leave the last ones unwritten.)
#[test]
fn sigterm_leaves_no_finished_notification_without_its_receipt() {
    let n = 3000u64;
    let w = world("");
    let log = w.env.dir.path().join("run.log");
    let mut child = spawn(&w.env, &log);
    w.env.drop_file("n.jsonl", notifications(n));
    wait_for("sending under way", || w.sim.accepted_count() >= 1000);
    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "exit 0 on SIGTERM, got {status:?}");

    let finished = finished_ids(&w.env);
    assert!(finished.len() >= 1000, "{} finished", finished.len());
    let missing = missing_receipts(&w.env);
    assert!(
        missing.is_empty(),
        "{} of {} finished notifications have no receipt after SIGTERM, e.g. {:?}",
        missing.len(),
        finished.len(),
        &missing[..missing.len().min(5)]
    );
    let logged = finished_lines(&log);
    let unlogged: Vec<&String> = finished.iter().filter(|id| !logged.contains(*id)).collect();
    assert!(
        unlogged.is_empty(),
        "{} finished notifications have no notification_finished line, e.g. {:?}",
        unlogged.len(),
        &unlogged[..unlogged.len().min(5)]
    );
}

/// kill -9 while notifications finish, then a restart: every notification finished before
/// the kill has its receipt (the start-up sweep writes the missing ones, each with its
/// `notification_finished` line, and says how many), and the temporary files of receipts the
/// kill cut short are gone, while other files in the folder stay.
#[test]
fn sigkill_then_restart_writes_the_missing_receipts_and_removes_stale_temp_files() {
    let n = 3000u64;
    let w = world("");
    let dir = receipts_dir(&w.env);
    let log1 = w.env.dir.path().join("run1.log");
    let mut child = spawn(&w.env, &log1);
    w.env.drop_file("n.jsonl", notifications(n));
    wait_for("receipts being written", || {
        receipt_ids(&w.env).len() >= 300
    });
    signal(&child, libc::SIGKILL);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(!status.success());

    // The kill's window between a notification's commit and its receipt, made certain: drop
    // some receipts written before the kill (as if the kill had come before them), and leave
    // the temporary files a receipt write cut short leaves.
    let had: Vec<String> = {
        let have = receipt_ids(&w.env);
        finished_ids(&w.env)
            .into_iter()
            .filter(|id| have.contains(id))
            .take(25)
            .collect()
    };
    assert_eq!(had.len(), 25);
    for id in &had {
        std::fs::remove_file(dir.join(format!("{id}.json"))).unwrap();
    }
    let finished_before_restart = finished_ids(&w.env);
    let missing_before = missing_receipts(&w.env);
    let stale = [".r1.json.tmp", ".r2999.json.tmp", ".gone-long-ago.json.tmp"];
    for name in stale {
        std::fs::write(dir.join(name), "{\"id\": \"half").unwrap();
    }
    // Not the daemon's: stays.
    let foreign = ["notes.txt", ".r1.json", "r1.json.tmp", ".some.tmp"];
    for name in foreign {
        std::fs::write(dir.join(name), "keep").unwrap();
    }

    let log2 = w.env.dir.path().join("run2.log");
    let mut child = spawn(&w.env, &log2);
    wait_for("the start-up sweep's line", || {
        !lines_of(&log2, "receipts_recovered").is_empty()
    });
    w.wait_idle("everything final after the restart");
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());

    let missing = missing_receipts(&w.env);
    assert!(
        missing.is_empty(),
        "{} finished notifications have no receipt after the restart, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(finished_ids(&w.env).len(), n as usize);
    for name in stale {
        assert!(
            !dir.join(name).exists(),
            "{name} should be removed at start"
        );
    }
    for name in foreign {
        assert_eq!(
            std::fs::read_to_string(dir.join(name)).unwrap(),
            "keep",
            "{name} is not the daemon's"
        );
    }
    let line = &lines_of(&log2, "receipts_recovered")[0];
    assert_eq!(
        field(line, "count") as usize,
        missing_before.len(),
        "written late: exactly the ones missing at the restart ({line})"
    );
    assert!(field(line, "checked") as usize >= finished_before_restart.len());
    // Ours, and those of the receipts the kill cut short.
    assert!(
        field(line, "stale_temp_files") >= stale.len() as u64,
        "{line}"
    );
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with('.') && name.ends_with(".json.tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    let logged = finished_lines(&log2);
    for id in &missing_before {
        assert!(
            logged.contains(id),
            "{id} has its notification_finished line"
        );
    }
    // Everything finished before the kill was logged in the first run or at the restart;
    // receipts already there were not rewritten.
    assert!(
        lines_of(&log2, "notification_finished")
            .iter()
            .filter(|l| l.contains("late=true"))
            .count()
            == missing_before.len()
    );
}

/// With `keep_finished_days = 0`, a purge keeps a notification that finished within the
/// last hour while receipts are on: its receipt may still be on its way (here it is lost as a
/// kill between the finish and the receipt would lose it), and the next start writes it from
/// the notification, which a purge would have taken with it.
#[test]
fn a_purge_keeps_a_just_finished_notification_for_its_receipt() {
    let w = World::new(SimOptions::default(), common::world::FAST_SENDER);
    let text = std::fs::read_to_string(&w.env.config_path).unwrap();
    let text = text.replace("[store]\n", "[store]\nkeep_finished_days = 0\n");
    std::fs::write(&w.env.config_path, text).unwrap();
    let dir = receipts_dir(&w.env);
    let daemon = w.env.start();
    w.env.drop_file(
        "a.json",
        notification_to("first", &format!(r#"{{"tokens":["{}"]}}"#, token(1)), ""),
    );
    wait_for("the receipt", || dir.join("first.json").exists());
    daemon.shutdown();
    std::fs::remove_file(dir.join("first.json")).unwrap();
    let out = w.env.pushdrop(&["purge"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("older than 60 minutes (receipts are on"),
        "{said}"
    );
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM notifications WHERE ext_id = 'first'"),
        1,
        "kept for its receipt"
    );
    let daemon = w.env.start();
    wait_for("the receipt written at start", || {
        dir.join("first.json").exists()
    });
    daemon.shutdown();
}

/// A receipt that cannot be written (its folder unusable: full, read-only, here a file in its
/// place) is said in `status` and written while the daemon runs once the folder is usable
/// again, not only at its next start; no temporary file is left behind.
#[test]
fn a_receipt_that_could_not_be_written_is_written_once_it_can_be() {
    let w = World::new(SimOptions::default(), common::world::FAST_SENDER);
    let dir = receipts_dir(&w.env);
    let daemon = w.env.start();
    w.env.drop_file(
        "a.json",
        notification_to("first", &format!(r#"{{"tokens":["{}"]}}"#, token(1)), ""),
    );
    wait_for("first receipt", || dir.join("first.json").exists());
    // The folder becomes unusable.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, "not a folder").unwrap();
    w.env.drop_file(
        "b.json",
        notification_to("second", &format!(r#"{{"tokens":["{}"]}}"#, token(2)), ""),
    );
    wait_for("the failure in status", || {
        w.env.status_json()["recent_errors"]
            .to_string()
            .contains("cannot write the receipt of second")
    });
    // Usable again: written within the retry period, no restart.
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let written_within_30_s = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.join(name).exists() {
            assert!(Instant::now() < deadline, "{name} never written");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    written_within_30_s("second.json");
    let names = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(), ["second.json"], "no temporary file left");

    // A receipt still missing at a stop is the next start's to write; when that start cannot
    // (the folder still unusable), it too is written once the folder is usable, while the
    // daemon runs (a probe's finding: only the start after that wrote it).
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, "not a folder").unwrap();
    w.env.drop_file(
        "c.json",
        notification_to("third", &format!(r#"{{"tokens":["{}"]}}"#, token(3)), ""),
    );
    // (status notes such a failure once a minute: "second" was that minute's)
    wait_for("third sent", || {
        w.env.count(
            "SELECT count(*) FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE n.ext_id = 'third' AND d.state = 1",
        ) == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    daemon.shutdown();
    assert!(!dir.is_dir());
    let daemon = w.env.start();
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    written_within_30_s("third.json");
    daemon.shutdown();
    assert!(names().contains(&"third.json".to_string()));
}

/// A receipt that still fails when its notification is purged can never be written: the
/// daemon says so (`receipt_lost`, naming the notification) instead of dropping it silently
/// at its next retry (a probe's finding). The notification's finish is backdated past the
/// purge's hour rather than waited for.
#[test]
fn a_receipt_whose_notification_is_purged_while_it_fails_is_said_lost() {
    let w = World::new(SimOptions::default(), common::world::FAST_SENDER);
    let text = std::fs::read_to_string(&w.env.config_path).unwrap();
    let text = text.replace("[store]\n", "[store]\nkeep_finished_days = 0\n");
    std::fs::write(&w.env.config_path, text).unwrap();
    let dir = receipts_dir(&w.env);
    let log = w.env.dir.path().join("run.log");
    let mut child = spawn(&w.env, &log);
    wait_for("the start", || !lines_of(&log, "started").is_empty());
    // The folder (made at the first receipt) becomes unusable: a daemon would not start
    // with a file in its place.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::write(&dir, "not a folder").unwrap();
    w.env.drop_file(
        "a.json",
        notification_to("gone", &format!(r#"{{"tokens":["{}"]}}"#, token(1)), ""),
    );
    wait_for("the receipt's failure", || {
        lines_of(&log, "receipt_error")
            .iter()
            .any(|l| l.contains("gone"))
    });
    let two_hours_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 2 * 3600 * 1000;
    w.env
        .db_rw()
        .execute(
            "UPDATE deliveries SET finished_at = ?1, updated_at = ?1",
            [two_hours_ago],
        )
        .unwrap();
    let out = w.env.pushdrop(&["purge"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM notifications WHERE ext_id = 'gone'"),
        0,
        "purged"
    );
    // The folder is usable again: the next retry finds nothing to write from.
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    wait_for("the receipt said lost", || {
        lines_of(&log, "receipt_lost")
            .iter()
            .any(|l| l.contains("id=\"gone\"") && l.contains("WARN"))
    });
    assert!(!dir.join("gone.json").exists());
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
}

/// What someone left in the receipts folder is never written through or waited on: a
/// symlink at a receipt's temporary name (the receipt would have gone into its target) is
/// replaced by the receipt's own file, and a FIFO where a receipt goes (opening it would
/// block until a reader came) is left alone and said in `status`, while the other receipts
/// are written.
#[test]
fn a_symlink_or_fifo_in_the_receipts_folder_is_not_written_through_or_waited_on() {
    let w = World::new(SimOptions::default(), common::world::FAST_SENDER);
    let dir = receipts_dir(&w.env);
    std::fs::create_dir_all(&dir).unwrap();
    let victim = w.env.dir.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join(".sym.json.tmp")).unwrap();
    let fifo = dir.join("fifo.json");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let daemon = w.env.start();
    for (i, id) in ["sym", "fifo", "after"].iter().enumerate() {
        w.env.drop_file(
            &format!("{i}.json"),
            notification_to(id, &format!(r#"{{"tokens":["{}"]}}"#, token(i as u64)), ""),
        );
    }
    wait_for("the other receipts", || {
        dir.join("sym.json").exists() && dir.join("after.json").exists()
    });
    wait_for("the FIFO in status", || {
        w.env.status_json()["recent_errors"]
            .to_string()
            .contains("not a regular file")
    });
    let began = Instant::now();
    daemon.shutdown();
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let sym = std::fs::symlink_metadata(dir.join("sym.json")).unwrap();
    assert!(sym.is_file(), "the receipt is a file of its own");
    assert!(!dir.join(".sym.json.tmp").exists());
    let meta = std::fs::symlink_metadata(&fifo).unwrap();
    assert!(meta.file_type().is_fifo(), "the FIFO is left alone");
}
