//! The Dockerfile, docker-compose.yml and .env.example stay true to the binary: every environment
//! variable they set is a flag `facerec serve --help` lists, the values they give parse, the
//! commands they run exist, the port and the folders line up. No Docker engine is needed (none runs
//! here); hadolint and the compose schema check are run by hand (README, "Docker").

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Variables read outside clap: tracing's filter, and the Python interpreter of the fetch.
const NOT_FLAGS: &[&str] = &["RUST_LOG", "FACEREC_PYTHON"];
/// The usual AWS variables, read by the S3 client of IMAGE_STORE (object_store), not by clap.
const AWS_VARS: &[&str] = &["AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"];

fn repo_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fresh empty folder (no stray .env is read from it).
fn empty_dir(tag: &str) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("facerec-docker-files-{tag}-{}-{seq}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the binary with only `env` (and PATH) in its environment, in an empty folder.
fn facerec(args: &[&str], env: &BTreeMap<String, String>, tag: &str) -> Output {
    let dir = empty_dir(tag);
    let out = Command::new(env!("CARGO_BIN_EXE_facerec"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .current_dir(&dir)
        .output()
        .expect("the facerec binary runs");
    let _ = fs::remove_dir_all(&dir);
    out
}

/// The environment variables `facerec serve --help` lists (`[env: NAME=...]`).
fn serve_flags() -> BTreeSet<String> {
    let out = facerec(&["serve", "--help"], &BTreeMap::new(), "help");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout);
    let flags: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect())
        .collect();
    for known in ["HOST", "PORT", "MONGO_URI", "LOG_FILE", "PHOTO_DIR", "SAVE_CROPS", "RETENTION_DAYS", "SHUTDOWN_TIMEOUT", "LOG_FORMAT"] {
        assert!(flags.contains(known), "{known} missing from serve --help:\n{help}");
    }
    flags
}

/// Dockerfile instructions: (keyword, arguments), continuation lines joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                let (kw, args) = current.trim().split_once(char::is_whitespace).unwrap_or((current.trim(), ""));
                out.push((kw.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "the Dockerfile ends inside a continued line");
    out
}

/// `ENV K=V K2=V2` pairs (values without spaces or quotes, as this Dockerfile writes them).
fn env_pairs(args: &str) -> Vec<(String, String)> {
    args.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("ENV {kv}: write ENV NAME=value"));
            assert!(!v.contains('"') && !v.contains('\''), "ENV {kv}: no quotes, please");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// A JSON-array instruction argument (`["facerec", "serve"]`).
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{args} is not exec form ({e})"))
}

/// The lines of a YAML block nested under `path` (by indentation; enough for docker-compose.yml):
/// `key: value` pairs and `- item` entries, comments dropped.
fn yaml_block(text: &str, path: &[&str]) -> Vec<String> {
    let mut open: Vec<usize> = Vec::new(); // indentation of each key of `path` opened so far
    let mut children: Option<usize> = Some(0); // indentation of the entries at the current level
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        while open.last().is_some_and(|&o| indent <= o) {
            open.pop();
            children = Some(indent);
        }
        if open.len() == path.len() {
            out.push(t.to_owned());
            continue;
        }
        let level = *children.get_or_insert(indent);
        if indent == level && t == format!("{}:", path[open.len()]) {
            open.push(indent);
            children = None;
        }
    }
    out
}

/// `KEY: value` lines as a map (quotes around the value removed).
fn yaml_map(lines: &[String]) -> BTreeMap<String, String> {
    lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| !k.starts_with('-') && !k.contains(' '))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

/// Runs `facerec serve` with `env` and a MODEL_PACK that fails validation: the run stops right
/// after every other value parsed (clap rejects a bad value before that, naming it).
fn assert_values_parse(env: &BTreeMap<String, String>, what: &str) {
    let mut env = env.clone();
    env.insert("MODEL_PACK".into(), "../not-a-pack".into());
    let out = facerec(&["serve"], &env, what);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("MODEL_PACK '../not-a-pack'"), "{what}: a value does not parse:\n{stderr}");
}

fn assert_flags(names: impl IntoIterator<Item = String>, flags: &BTreeSet<String>, what: &str) {
    for name in names {
        assert!(flags.contains(&name) || NOT_FLAGS.contains(&name.as_str()), "{what} sets {name}, which `facerec serve` does not read");
    }
}

#[test]
fn dockerfile_matches_the_binary() {
    let flags = serve_flags();
    let instructions = dockerfile_instructions(&repo_file("Dockerfile"));
    let all = |kw: &str| instructions.iter().filter(|(k, _)| k == kw).map(|(_, a)| a.clone()).collect::<Vec<_>>();

    // Two stages; the runtime one sets ENV, a non-root USER, a HEALTHCHECK.
    assert_eq!(all("FROM").len(), 2, "multi-stage build");
    let env: BTreeMap<String, String> = all("ENV").iter().flat_map(|a| env_pairs(a)).collect();
    assert_flags(env.keys().cloned(), &flags, "the Dockerfile");
    let flag_env: BTreeMap<String, String> = env.iter().filter(|(k, _)| flags.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_values_parse(&flag_env, "dockerfile");

    let user = all("USER");
    assert_eq!(user.len(), 1);
    let uid = user[0].split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "runs as root: USER {}", user[0]);

    // The port it listens on is the one exposed.
    assert_eq!(all("EXPOSE"), vec![env["PORT"].clone()]);
    assert_eq!(env["HOST"], "0.0.0.0", "reachable from outside the container");

    // Every folder it writes to is a volume.
    let volumes: Vec<String> = all("VOLUME").iter().flat_map(|a| exec_form(a)).collect();
    let parent = |p: &str| Path::new(p).parent().unwrap().to_str().unwrap().to_owned();
    for dir in [parent(&env["DATABASE_PATH"]), env["PHOTO_DIR"].clone(), parent(&env["LOG_FILE"])] {
        assert!(volumes.contains(&dir), "{dir} is not a VOLUME ({volumes:?})");
    }

    // The commands exist: ENTRYPOINT + CMD, and the health check.
    let entrypoint = exec_form(&all("ENTRYPOINT")[0]);
    let cmd = exec_form(&all("CMD")[0]);
    assert_eq!(entrypoint, vec!["facerec"]);
    let mut serve_help: Vec<&str> = cmd.iter().map(String::as_str).collect();
    serve_help.push("--help");
    assert!(facerec(&serve_help, &BTreeMap::new(), "cmd").status.success(), "CMD {cmd:?}");
    let health = &all("HEALTHCHECK")[0];
    let (options, check) = health.split_once("CMD ").expect("HEALTHCHECK ... CMD [...]");
    assert!(options.contains("--interval") && options.contains("--timeout"), "{health}");
    let check = exec_form(check);
    assert_eq!(check[0], "facerec");
    let mut check_help: Vec<&str> = check[1..].iter().map(String::as_str).collect();
    check_help.push("--help");
    let out = facerec(&check_help, &BTreeMap::new(), "healthcheck");
    assert!(out.status.success(), "HEALTHCHECK {check:?}: {}", String::from_utf8_lossy(&out.stderr));
    // With nothing listening, the health check fails (it does not pass blindly).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let mut probe_env = flag_env.clone();
    probe_env.insert("PORT".into(), port);
    let mut probe: Vec<&str> = check[1..].iter().map(String::as_str).collect();
    probe.extend(["--timeout", "2s"]);
    assert!(!facerec(&probe, &probe_env, "probe").status.success());

    // The fetch at build time is the binary's own, into the cache the runtime stage reads.
    let runs = all("RUN").join("\n");
    assert!(runs.contains("facerec fetch"), "the build fetches with `facerec fetch`");
    let copies = all("COPY").join("\n");
    assert!(copies.contains(&format!("/models {}", env["MODEL_CACHE_DIR"])), "the fetched cache lands at MODEL_CACHE_DIR: {copies}");
    // The cuda build argument names a real feature.
    let cargo = repo_file("Cargo.toml");
    assert!(cargo.contains("\ncuda = ["), "Cargo.toml has the cuda feature the Dockerfile documents");
}

#[test]
fn compose_matches_the_binary() {
    let flags = serve_flags();
    let compose = repo_file("docker-compose.yml");
    assert_eq!(yaml_map(&yaml_block(&compose, &["services", "mongo"]))["image"], "mongo:7");
    let service = yaml_map(&yaml_block(&compose, &["services", "facerec"]));
    assert_eq!(service["build"], ".", "facerec is built from the Dockerfile");
    let env = yaml_map(&yaml_block(&compose, &["services", "facerec", "environment"]));
    assert!(!env.is_empty(), "facerec has an environment block");
    assert_flags(env.keys().cloned(), &flags, "docker-compose.yml");
    assert_values_parse(&env, "compose");
    // MONGO_URI points at the mongo service.
    assert!(env["MONGO_URI"].starts_with("mongodb://mongo:27017/"), "{}", env["MONGO_URI"]);
    // The published port reaches PORT.
    let ports = yaml_block(&compose, &["services", "facerec", "ports"]);
    assert!(ports.iter().any(|p| p.trim_start_matches("- ").trim_matches('"').ends_with(&format!(":{}", env["PORT"]))), "{ports:?}");
    // Volumes hold the database folder, the photo folder and the log's folder.
    let mounts: Vec<String> = yaml_block(&compose, &["services", "facerec", "volumes"])
        .iter()
        .filter_map(|l| l.trim_start_matches("- ").split(':').nth(1).map(str::to_owned))
        .collect();
    let parent = |p: &str| Path::new(p).parent().unwrap().to_str().unwrap().to_owned();
    for dir in [parent(&env["DATABASE_PATH"]), env["PHOTO_DIR"].clone(), parent(&env["LOG_FILE"])] {
        assert!(mounts.contains(&dir), "{dir} is not mounted ({mounts:?})");
    }
    // A stop grace period above SHUTDOWN_TIMEOUT (both in seconds here).
    let secs = |s: &str| s.trim_end_matches('s').parse::<u64>().unwrap_or_else(|_| panic!("{s}: write whole seconds like 20s"));
    assert!(secs(&service["stop_grace_period"]) > secs(&env["SHUTDOWN_TIMEOUT"]));
}

#[test]
fn compose_postgres_profile_matches_the_binary() {
    let flags = serve_flags();
    let compose = repo_file("docker-compose.yml");
    let service = |name: &str| yaml_map(&yaml_block(&compose, &["services", name]));
    let env_of = |name: &str| yaml_map(&yaml_block(&compose, &["services", name, "environment"]));
    assert_eq!(service("postgres")["image"], "pgvector/pgvector:pg16");
    assert!(service("minio")["image"].starts_with("minio/minio"));
    for name in ["postgres", "minio", "minio-init", "facerec-pg"] {
        assert_eq!(service(name)["profiles"], r#"["postgres"]"#, "{name} is in the optional profile only");
    }
    let facerec = service("facerec-pg");
    assert_eq!(facerec["build"], ".");
    let env = env_of("facerec-pg");
    let (aws, ours): (BTreeMap<String, String>, BTreeMap<String, String>) =
        env.clone().into_iter().partition(|(k, _)| AWS_VARS.contains(&k.as_str()));
    assert_eq!(aws.len(), AWS_VARS.len(), "every AWS variable the image store needs: {aws:?}");
    assert_flags(ours.keys().cloned(), &flags, "docker-compose.yml (facerec-pg)");
    assert!(!env.contains_key("MONGO_URI"), "MONGO_URI would win over DATABASE_URL");
    assert_values_parse(&env, "compose-pg");
    // DATABASE_URL reaches the postgres service with its user, password and database.
    let pg = env_of("postgres");
    let url = format!("postgres://{}:{}@postgres:5432/{}", pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]);
    assert_eq!(env["DATABASE_URL"], url);
    // IMAGE_STORE's bucket is the one minio-init makes, on MinIO with its root keys.
    let (minio, init) = (env_of("minio"), env_of("minio-init"));
    let bucket = env["IMAGE_STORE"].strip_prefix("s3://").and_then(|r| r.split('/').next()).expect("IMAGE_STORE=s3://BUCKET/PREFIX");
    assert_eq!(init["BUCKET"], bucket);
    assert!(service("minio-init")["entrypoint"].contains("mc mb --ignore-existing"), "minio-init makes the bucket");
    assert_eq!(env["AWS_ENDPOINT_URL"], "http://minio:9000");
    assert_eq!(env["AWS_ALLOW_HTTP"], "true", "MinIO answers plain http here");
    assert_eq!(
        (env["AWS_ACCESS_KEY_ID"].as_str(), env["AWS_SECRET_ACCESS_KEY"].as_str()),
        (minio["MINIO_ROOT_USER"].as_str(), minio["MINIO_ROOT_PASSWORD"].as_str())
    );
    assert_eq!(
        (init["MINIO_ROOT_USER"].as_str(), init["MINIO_ROOT_PASSWORD"].as_str()),
        (minio["MINIO_ROOT_USER"].as_str(), minio["MINIO_ROOT_PASSWORD"].as_str())
    );
    // Its folders are mounted, and it stops after SHUTDOWN_TIMEOUT.
    let mounts: Vec<String> = yaml_block(&compose, &["services", "facerec-pg", "volumes"])
        .iter()
        .filter_map(|l| l.trim_start_matches("- ").split(':').nth(1).map(str::to_owned))
        .collect();
    let parent = |p: &str| Path::new(p).parent().unwrap().to_str().unwrap().to_owned();
    for dir in [parent(&env["DATABASE_PATH"]), env["PHOTO_DIR"].clone(), parent(&env["LOG_FILE"])] {
        assert!(mounts.contains(&dir), "{dir} is not mounted ({mounts:?})");
    }
    let secs = |s: &str| s.trim_end_matches('s').parse::<u64>().unwrap_or_else(|_| panic!("{s}: write whole seconds like 20s"));
    assert!(secs(&facerec["stop_grace_period"]) > secs(&env["SHUTDOWN_TIMEOUT"]));
}

#[test]
fn env_example_names_only_flags() {
    let flags = serve_flags();
    let names: Vec<String> = repo_file(".env.example")
        .lines()
        .map(|l| l.trim().trim_start_matches('#').trim())
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k.trim().to_owned())
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .collect();
    assert!(names.len() > 10, "{names:?}");
    assert_flags(names, &flags, ".env.example");
}

#[test]
fn yaml_blocks_are_read_by_indentation() {
    let text = "a:\n  b:\n    c: 1\n    d: \"x\"\n    # note\n  e:\n    - f\n    b:\n      g: 3\nb:\n  c: 2\n  e:\n    h: 4\n";
    assert_eq!(yaml_block(text, &["a", "b"]), vec!["c: 1", "d: \"x\""]);
    assert_eq!(yaml_map(&yaml_block(text, &["a", "b"]))["d"], "x");
    assert_eq!(yaml_block(text, &["a", "e"]), vec!["- f", "b:", "g: 3"]);
    assert_eq!(yaml_block(text, &["b"]), vec!["c: 2", "e:", "h: 4"]);
    assert_eq!(yaml_block(text, &["b", "e"]), vec!["h: 4"]);
    assert!(yaml_block(text, &["e"]).is_empty());
}
