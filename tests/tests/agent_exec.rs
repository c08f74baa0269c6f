//! The agent's exec stream (`POST /exec`, docs/agent-exec.md), served by the
//! real `banger-agent serve --tcp` on loopback, driven frame by frame:
//! exit codes, stdin, signals to the process group, large output, a pty
//! with window size changes, and refusal without the secret. Needs the
//! agent built (`cargo build -p banger-agent`); no VM.

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use banger_guest_protocol::exec::{
        ExecRequest, ExitStatus, Frame, KEEPALIVE, SECRET_PATH, UPGRADE, WindowSize,
    };

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    struct Agent {
        child: Child,
        addr: String,
        _root: tempfile::TempDir,
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn agent_bin() -> Option<PathBuf> {
        let bin = test_infra::workspace_bin("banger-agent");
        if bin.is_file() {
            Some(bin)
        } else {
            eprintln!("SKIP: no {} (cargo build -p banger-agent)", bin.display());
            None
        }
    }

    /// An agent whose root holds `secret` (none when `None`).
    fn start_agent(secret: Option<&str>) -> Option<Agent> {
        let bin = agent_bin()?;
        let root = tempfile::tempdir().unwrap();
        if let Some(s) = secret {
            let path = root.path().join(SECRET_PATH);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, format!("{s}\n")).unwrap();
        }
        let mut child = Command::new(bin)
            .args(["serve", "--tcp", "127.0.0.1:0", "--root"])
            .arg(root.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("banger-agent: serving the agent API on tcp ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Some(Agent {
            child,
            addr,
            _root: root,
        })
    }

    /// Sends the exec head; returns the status and, on 101, the stream.
    fn open(agent: &Agent, auth: Option<&str>) -> (u16, TcpStream) {
        let mut s = TcpStream::connect(&agent.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let auth = auth
            .map(|a| format!("Authorization: Bearer {a}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "POST /exec HTTP/1.1\r\nHost: agent\r\n{auth}Connection: Upgrade\r\nUpgrade: {UPGRADE}\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "closed in the head");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        (head.split(' ').nth(1).unwrap().parse().unwrap(), s)
    }

    fn start(agent: &Agent, req: ExecRequest) -> TcpStream {
        let (status, mut s) = open(agent, Some(SECRET));
        assert_eq!(status, 101);
        Frame::Start(req).write_to(&mut s).unwrap();
        s
    }

    fn argv(words: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: words.iter().map(|w| w.to_string()).collect(),
            ..Default::default()
        }
    }

    /// What came back: stdout, stderr, and the last frame.
    #[derive(Debug, Default)]
    struct Outcome {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        exit: Option<ExitStatus>,
        error: Option<String>,
    }

    /// Reads frames to the end; `until` sees stdout so far and may send
    /// frames (stdin, signals) once it has what it waits for.
    fn collect(s: &mut TcpStream, mut until: impl FnMut(&[u8], &mut TcpStream)) -> Outcome {
        let mut out = Outcome::default();
        let mut r = s.try_clone().unwrap();
        while let Some(f) = Frame::read_from(&mut r).unwrap() {
            match f {
                Frame::Stdout(d) => {
                    out.stdout.extend_from_slice(&d);
                    until(&out.stdout, s);
                }
                Frame::Stderr(d) => out.stderr.extend_from_slice(&d),
                Frame::Exit(e) => out.exit = Some(e),
                Frame::Error(e) => out.error = Some(e),
                other => panic!("the agent sent a host frame {other:?}"),
            }
        }
        out
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn exit_codes_and_separate_stdout_and_stderr_come_back() {
        let Some(agent) = start_agent(Some(SECRET)) else {
            return;
        };
        let mut s = start(
            &agent,
            argv(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
        );
        let o = collect(&mut s, |_, _| {});
        assert_eq!(o.exit.map(|e| e.code), Some(Some(7)), "{o:?}");
        assert_eq!(text(&o.stdout), "out\n");
        assert_eq!(text(&o.stderr), "err\n");

        let mut req = argv(&["sh", "-c", "echo \"$GREETING\"; pwd"]);
        req.env.insert("GREETING".into(), "hi there".into());
        req.cwd = Some("/tmp".into());
        let mut s = start(&agent, req);
        let o = collect(&mut s, |_, _| {});
        assert_eq!(text(&o.stdout), "hi there\n/tmp\n");
        assert_eq!(o.exit.unwrap().code, Some(0));

        let mut s = start(&agent, argv(&["/no/such/program"]));
        let o = collect(&mut s, |_, _| {});
        assert!(o.exit.is_none());
        let err = o.error.unwrap();
        assert!(err.contains("/no/such/program"), "{err}");
    }

    #[test]
    fn stdin_streams_to_the_command_until_eof() {
        let Some(agent) = start_agent(Some(SECRET)) else {
            return;
        };
        let mut s = start(
            &agent,
            argv(&["sh", "-c", "read first; echo \"got $first\"; cat"]),
        );
        Frame::Stdin(b"one\n".to_vec()).write_to(&mut s).unwrap();
        let mut sent_rest = false;
        let o = collect(&mut s, |so, s| {
            // The second piece goes only after the first was answered: the
            // command really reads as the bytes arrive.
            if !sent_rest && so.starts_with(b"got one\n") {
                sent_rest = true;
                Frame::Stdin(b"two\nthree".to_vec()).write_to(s).unwrap();
                Frame::StdinEof.write_to(s).unwrap();
            }
        });
        assert_eq!(text(&o.stdout), "got one\ntwo\nthree");
        assert_eq!(o.exit.unwrap().code, Some(0));
    }

    #[test]
    fn signals_reach_the_whole_process_group_and_others_are_ignored() {
        let Some(agent) = start_agent(Some(SECRET)) else {
            return;
        };
        // The background sleep holds stdout open: the stream only ends if
        // the signal reached it too, not just the shell.
        let mut s = start(&agent, argv(&["sh", "-c", "sleep 300 & echo ready; wait"]));
        let mut signalled = false;
        let o = collect(&mut s, |so, s| {
            if !signalled && so.ends_with(b"ready\n") {
                signalled = true;
                // SIGSTOP is not allowed: if it were applied, the SIGTERM
                // would stay pending and the stream would never end.
                Frame::Signal(19).write_to(s).unwrap();
                Frame::Signal(15).write_to(s).unwrap();
            }
        });
        assert_eq!(
            o.exit,
            Some(ExitStatus {
                code: None,
                signal: Some(15)
            }),
            "{o:?}"
        );
    }

    #[test]
    fn a_large_output_arrives_intact() {
        let Some(agent) = start_agent(Some(SECRET)) else {
            return;
        };
        // About 14 MiB, compared with the same command run here.
        let expected = Command::new("seq").args(["1", "2000000"]).output().unwrap();
        assert!(expected.stdout.len() > 10 << 20);
        let mut s = start(&agent, argv(&["seq", "1", "2000000"]));
        let o = collect(&mut s, |_, _| {});
        assert_eq!(o.exit.unwrap().code, Some(0));
        assert_eq!(o.stdout.len(), expected.stdout.len());
        assert!(o.stdout == expected.stdout, "the output differs");
    }

    #[test]
    fn a_pty_session_has_a_terminal_its_size_and_ctrl_c() {
        let Some(agent) = start_agent(Some(SECRET)) else {
            return;
        };
        let mut req = argv(&[
            "sh",
            "-c",
            "test -t 0 && echo tty-yes; stty size; read x; stty size; exec sleep 300",
        ]);
        req.tty = Some(WindowSize { rows: 24, cols: 80 });
        let mut s = start(&agent, req);
        let (mut resized, mut interrupted) = (false, false);
        let o = collect(&mut s, |so, s| {
            let so = text(so);
            if !resized && so.contains("24 80") {
                resized = true;
                Frame::Resize(WindowSize {
                    rows: 50,
                    cols: 132,
                })
                .write_to(s)
                .unwrap();
                Frame::Stdin(b"go\n".to_vec()).write_to(s).unwrap();
            }
            if resized && !interrupted && so.contains("50 132") {
                interrupted = true;
                // Ctrl-C typed at the terminal: the line discipline turns
                // it into SIGINT for the foreground process.
                Frame::Stdin(vec![3]).write_to(s).unwrap();
            }
        });
        let out = text(&o.stdout);
        assert!(out.contains("tty-yes"), "{out:?}");
        assert!(out.contains("24 80") && out.contains("50 132"), "{out:?}");
        assert_eq!(o.exit.unwrap().signal, Some(2), "{o:?}");
    }

    #[test]
    fn refuses_without_or_with_a_wrong_secret() {
        let Some(agent) = start_agent(Some(SECRET)) else {
            return;
        };
        assert_eq!(open(&agent, None).0, 401);
        assert_eq!(
            open(&agent, Some("0123456789abcdef0123456789abcdeX")).0,
            401
        );
        assert_eq!(open(&agent, Some("")).0, 401);
        // The refused connection runs nothing: a Start sent anyway is
        // never answered with frames.
        let (status, mut s) = open(&agent, Some("wrong"));
        assert_eq!(status, 401);
        let _ = Frame::Start(argv(&["sh", "-c", "echo ran"])).write_to(&mut s);
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        assert!(!rest.contains("ran"), "{rest:?}");

        let Some(no_secret) = start_agent(None) else {
            return;
        };
        assert_eq!(open(&no_secret, Some(SECRET)).0, 403);
    }

    #[test]
    fn a_host_that_goes_away_takes_the_command_with_it() {
        let Some(agent) = start_agent(Some(SECRET)) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "echo $$ > {}; echo ready; exec sleep 300",
            pidfile.display()
        );
        let mut s = start(&agent, argv(&["sh", "-c", &script]));
        let mut buf = Vec::new();
        while !text(&buf).contains("ready") {
            match Frame::read_from(&mut s).unwrap() {
                Some(Frame::Stdout(d)) => buf.extend_from_slice(&d),
                other => panic!("{other:?}"),
            }
        }
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(s);
        test_infra::wait_until(Duration::from_secs(10), "the command to be killed", || {
            !alive(pid)
        });
    }

    #[test]
    fn a_host_silent_past_its_keepalive_deadline_is_taken_for_gone() {
        let Some(agent) = start_agent(Some(SECRET)) else {
            return;
        };
        // 100 ms promised: the agent gives up after 750 ms without a byte.
        let every = Duration::from_millis(100);
        let with_keepalive = |words: &[&str]| ExecRequest {
            keepalive_ms: Some(100),
            ..argv(words)
        };

        // Silent, stream open: the command (waiting on its stdin) is
        // killed as if the host had closed the stream.
        let mut s = start(&agent, with_keepalive(&["cat"]));
        let o = collect(&mut s, |_, _| {});
        assert_eq!(o.exit.and_then(|e| e.signal), Some(9), "{o:?}");

        // The same promise kept: a command that outlives the deadline
        // twice over ends on its own.
        let s = start(&agent, with_keepalive(&["sh", "-c", "sleep 2; echo done"]));
        let mut w = s.try_clone().unwrap();
        let beat = std::thread::spawn(move || {
            while KEEPALIVE.write_to(&mut w).is_ok() {
                std::thread::sleep(every / 2);
            }
        });
        let mut r = s.try_clone().unwrap();
        let o = collect(&mut r, |_, _| {});
        assert_eq!(
            (o.exit.map(|e| e.code), text(&o.stdout)),
            (Some(Some(0)), "done\n".into())
        );
        drop(s);
        beat.join().unwrap();

        // No promise (an older host): silence is no deadline.
        let mut s = start(&agent, argv(&["sh", "-c", "sleep 2; echo done"]));
        let o = collect(&mut s, |_, _| {});
        assert_eq!(
            (o.exit.map(|e| e.code), text(&o.stdout)),
            (Some(Some(0)), "done\n".into())
        );
    }

    /// A live process (a zombie waiting for its parent counts as gone).
    fn alive(pid: i32) -> bool {
        let stat = Path::new("/proc").join(pid.to_string()).join("stat");
        std::fs::read_to_string(stat)
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }
}
