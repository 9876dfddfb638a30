#!/usr/bin/env python3
"""The original contract, side by side: the original service and facerec on the same requests.

Starts a MongoDB wire server (SecantusDB), the original service (`seed_server.py`: FastAPI +
insightface + pymongo, rebuilt from its README; its path in SEED_SERVER) on one database and
facerec (FACEREC_BIN, MONGO_URI) on another, sends both the same requests and compares status
codes, bodies (similarities within 1e-3, embeddings by cosine), the `logs.txt` lines, /metadata,
the crop files and the MongoDB documents. facerec may add fields (`skipped`, the entries' extra
fields the original drops); it may not change or lose any. Every difference the README lists as
deliberate is reported as such, not as a failure. Exit status 0 when nothing else differs.

Run it through scripts/compat_original.sh, which installs the Python side. Environment:
  SEED_SERVER   path to seed_server.py (required)
  FACEREC_BIN   the facerec binary (default target/release/facerec, else target/debug/facerec)
  PACK          the buffalo_sc pack folder (default models/buffalo_sc, fetched by `facerec fetch`)
  SECANTUSD     the secantusd-py executable
  FR_ENV        optional: settings for facerec, e.g. "LEGACY_STATUS=http" (then the check fails)
  FACES_DIR     optional: a face set with labels.json and golden/ (the shared one): adds a crop of
                every labelled photo's face, and those photos whole, to the comparison
  WORK          scratch folder (default target/compat/run)
"""
import base64
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pymongo
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SIM_TOL = 1e-3
COS_MIN = 0.9999

failures, notes = [], []


def check(ok, what, detail=""):
    print(("OK    " if ok else "DIFF  ") + what + (f": {detail}" if detail and not ok else ""))
    if not ok:
        failures.append(f"{what}: {detail}")
    return ok


def note(what):
    print("NOTE  " + what)
    notes.append(what)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(url, proc, what, secs=300):
    t = time.time()
    while time.time() - t < secs:
        if proc.poll() is not None:
            sys.exit(f"{what} exited at start (status {proc.returncode})")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.5)
    sys.exit(f"{what} did not answer within {secs} s")


# ------------------------------------------------------------------------------------------------
# Comparison: the original's value must be found in facerec's (objects: every key of the original,
# equal; facerec may add keys), numbers equal (similarities within SIM_TOL), 512-vectors by cosine.


def diff(orig, ours, path="$", extra=None):
    """The differences between the original's value and facerec's, as a list of strings."""
    out = []
    if isinstance(orig, dict):
        if not isinstance(ours, dict):
            return [f"{path}: object vs {type(ours).__name__}"]
        for k, v in orig.items():
            if k not in ours:
                out.append(f"{path}.{k}: missing in facerec")
            else:
                out += diff(v, ours[k], f"{path}.{k}", extra)
        if extra is not None:
            extra.update(f"{path}.{k}" for k in ours if k not in orig)
        return out
    if isinstance(orig, list):
        if not isinstance(ours, list):
            return [f"{path}: list vs {type(ours).__name__}"]
        if len(orig) == 512 and len(ours) == 512 and all(isinstance(x, (int, float)) for x in orig + ours):
            a, b = np.array(orig, np.float64), np.array(ours, np.float64)
            cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
            return [] if cos >= COS_MIN else [f"{path}: embedding cosine {cos:.7f} < {COS_MIN}"]
        if len(orig) != len(ours):
            return [f"{path}: {len(orig)} items vs {len(ours)}"]
        for i, (a, b) in enumerate(zip(orig, ours)):
            out += diff(a, b, f"{path}[{i}]", extra)
        return out
    if isinstance(orig, bool) or orig is None or isinstance(orig, str):
        return [] if orig == ours and type(orig) is type(ours) else [f"{path}: {orig!r} vs {ours!r}"]
    if isinstance(orig, (int, float)):
        if not isinstance(ours, (int, float)) or isinstance(ours, bool):
            return [f"{path}: {orig!r} vs {ours!r}"]
        tol = SIM_TOL if path.endswith(".similarity") else 1e-9 * max(1.0, abs(orig))
        if isinstance(orig, float) and math.isinf(orig):
            return [] if orig == ours else [f"{path}: {orig!r} vs {ours!r}"]
        return [] if abs(orig - ours) <= tol else [f"{path}: {orig!r} vs {ours!r}"]
    return [f"{path}: unexpected type {type(orig).__name__}"]


def compare(what, o, f, allowed_extra=()):
    """Compares two responses: status, content type and JSON body."""
    ok = check(o.status_code == f.status_code, f"{what}: status", f"original {o.status_code}, facerec {f.status_code}")
    try:
        ob, fb = o.json(), f.json()
    except ValueError:
        return check(False, f"{what}: body", f"not JSON: {o.text[:200]!r} / {f.text[:200]!r}")
    extra = set()
    d = diff(ob, fb, "$", extra)
    ok &= check(not d, f"{what}: body", "; ".join(d[:5]) + (f" (+{len(d) - 5})" if len(d) > 5 else ""))
    unexpected = {e for e in extra if not any(e.endswith(a) for a in allowed_extra)}
    if unexpected:
        note(f"{what}: facerec adds {sorted(unexpected)[:6]}")
    return ok, ob, fb


# ------------------------------------------------------------------------------------------------


def jpeg(img):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


def b64(data):
    return base64.b64encode(data).decode()


def fixture(name):
    with open(os.path.join(FIXTURES, name), "rb") as fh:
        return fh.read()


def crop_around(img, box, margin):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    X1, Y1 = max(0, int(x1 - w * margin)), max(0, int(y1 - h * margin))
    X2, Y2 = min(img.shape[1], int(x2 + w * margin)), min(img.shape[0], int(y2 + h * margin))
    return img[Y1:Y2, X1:X2]


def main():
    seed = os.environ.get("SEED_SERVER") or sys.exit("set SEED_SERVER to the original's seed_server.py")
    binary = os.environ.get("FACEREC_BIN") or next(
        (p for p in (os.path.join(ROOT, "target/release/facerec"), os.path.join(ROOT, "target/debug/facerec")) if os.path.exists(p)), None
    )
    if not binary:
        sys.exit("no facerec binary: cargo build (or set FACEREC_BIN)")
    pack = os.path.abspath(os.environ.get("PACK", os.path.join(ROOT, "models/buffalo_sc")))
    secantusd = os.environ.get("SECANTUSD") or shutil.which("secantusd-py") or sys.exit("set SECANTUSD")
    work = os.path.abspath(os.environ.get("WORK", os.path.join(ROOT, "target/compat/run")))
    shutil.rmtree(work, ignore_errors=True)
    seed_dir, fr_dir = os.path.join(work, "original"), os.path.join(work, "facerec")
    os.makedirs(seed_dir)
    os.makedirs(fr_dir)
    procs = []

    def stop_all(*_):
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, lambda *a: (stop_all(), sys.exit(1)))
    try:
        mg_port = free_port()
        mongo = subprocess.Popen([secantusd, "--host", "127.0.0.1", "--port", str(mg_port), "--storage-path", ":memory:"],
                                 stdout=open(os.path.join(work, "mongo.log"), "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(mongo)
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{mg_port}", serverSelectionTimeoutMS=500)
        for _ in range(120):
            try:
                client.admin.command("ping")
                break
            except pymongo.errors.PyMongoError:
                time.sleep(0.5)
        # The original has no way to create users: they were inserted by the dashboard.
        for db in ("original", "facerec"):
            client[db].users.insert_many([{"username": "alice", "embeddings": []}, {"username": "bob", "embeddings": []},
                                          {"username": "José", "embeddings": []}])
        seed_port, fr_port = free_port(), free_port()
        env = dict(os.environ, MONGO_URI=f"mongodb://127.0.0.1:{mg_port}/original", FACE_PACK=pack, DET_SIZE="320")
        uvicorn = os.path.join(os.path.dirname(sys.executable), "uvicorn")
        seed_proc = subprocess.Popen([uvicorn, "--app-dir", os.path.dirname(os.path.abspath(seed)), "seed_server:app", "--host", "127.0.0.1",
                                      "--port", str(seed_port)], cwd=seed_dir, env=env, stdout=open(os.path.join(work, "original.log"), "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(seed_proc)
        fenv = dict(os.environ, HOST="127.0.0.1", PORT=str(fr_port), MONGO_URI=f"mongodb://127.0.0.1:{mg_port}/facerec", DET_SIZE="320",
                    LOG_FILE=os.path.join(fr_dir, "logs.txt"), PHOTO_DIR=os.path.join(fr_dir, "photo"), EXECUTION_PROVIDER="cpu",
                    MODEL_CACHE_DIR=os.path.dirname(pack), MODEL_PACK=os.path.basename(pack), RUST_LOG="warn")
        for k in ("LEGACY_STATUS", "ALIGNED_INPUT", "JWT_SECRET_KEY", "API_KEYS"):
            fenv.pop(k, None)
        # FR_ENV="LEGACY_STATUS=http ...": settings for facerec (to see what they change).
        fenv.update(kv.split("=", 1) for kv in os.environ.get("FR_ENV", "").split())
        fr_proc = subprocess.Popen([binary, "serve"], cwd=fr_dir, env=fenv, stdout=open(os.path.join(work, "facerec.log"), "w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(fr_proc)
        O, F = f"http://127.0.0.1:{seed_port}", f"http://127.0.0.1:{fr_port}"
        wait_http(O + "/metadata", seed_proc, "the original")
        wait_http(F + "/health", fr_proc, "facerec")
        run(O, F, client)
        compare_files(seed_dir, fr_dir)
        documented(O, F)
    finally:
        stop_all()
    print()
    print(f"{len(failures)} difference(s) not documented; {len(notes)} note(s)")
    for f in failures:
        print("  DIFF " + f)
    print(json.dumps({"compat_original": "pass" if not failures else "fail", "differences": len(failures), "notes": len(notes)}))
    return 0 if not failures else 1


def both(method, path, **kw):
    def go(base):
        files = kw.get("files")
        if files is not None:
            kw["files"] = [(n, (fn, data)) for n, fn, data in files]
        r = requests.request(method, base + path, timeout=600, **kw)
        if files is not None:
            kw["files"] = files
        return r
    return go(BASES[0]), go(BASES[1])


BASES = []


def run(O, F, client):
    BASES[:] = [O, F]
    o, f = both("GET", "/metadata")
    compare("GET /metadata before any recognition", o, f)
    o, f = both("GET", "/")
    check(o.status_code == f.status_code == 200 and "text/html" in o.headers.get("content-type", "") and "text/html" in f.headers.get("content-type", ""),
          "GET /: 200 text/html")

    grey = cv2.imencode(".png", np.full((200, 200, 3), 128, np.uint8))[1].tobytes()
    # Enrolment: the original's two errors, exactly.
    o, f = both("POST", "/calculate_average_embedding", data={"username": "nobody"}, files=[("files", "img5.jpg", fixture("img5.jpg"))])
    compare("enrol an unknown user", o, f)
    check(o.text.replace(" ", "") == f.text.replace(" ", ""), "enrol an unknown user: the same bytes (but the separators)", f"{o.text!r} vs {f.text!r}")
    o, f = both("POST", "/calculate_average_embedding", data={"username": "alice"}, files=[("files", "grey.png", grey)])
    compare("enrol, no face in any image", o, f)
    o, f = both("POST", "/calculate_average_embedding", data={"username": "nobody"}, files=[("files", "grey.png", grey)])
    compare("enrol an unknown user, no face in any image", o, f)
    # First enrolments: the same template.
    o, f = both("POST", "/calculate_average_embedding", data={"username": "alice"},
                files=[("files", n, fixture(n)) for n in ("img5.jpg", "img6.jpg", "img10.jpg")])
    compare("enrol alice, three photos", o, f)
    o, f = both("POST", "/calculate_average_embedding", data={"username": "bob"},
                files=[("files", "img16.jpg", fixture("img16.jpg")), ("files", "notes.txt", b"not a photo"), ("files", "grey.png", grey)])
    compare("enrol bob: one photo, one unreadable file, one without a face", o, f, allowed_extra=("$.skipped",))
    o, f = both("POST", "/calculate_average_embedding", data={"username": "José"}, files=[("files", "t1.jpg", fixture("t1.jpg"))])
    compare("enrol José with a photo of six faces (the surest face)", o, f)
    # The documents, in the original's layout.
    for name in ("alice", "bob", "José"):
        od = client["original"].users.find_one({"username": name}, {"_id": 0})
        fd = client["facerec"].users.find_one({"username": name}, {"_id": 0})
        extra = set()
        d = diff(od, fd, f"users[{name}]", extra)
        check(not d, f"MongoDB users document of {name}", "; ".join(d))
        check(all(isinstance(x, float) for x in fd["embeddings"]), f"MongoDB {name}: embeddings are doubles")
    note(f"MongoDB documents: facerec adds {sorted(e.split('.')[-1] for e in extra)}")

    # Recognition.
    img11 = cv2.imread(os.path.join(FIXTURES, "img11.jpg"))
    golden = json.load(open(os.path.join(FIXTURES, "golden_det320.json")))["images"]
    alice_crop = jpeg(crop_around(img11, golden["img11.jpg"]["faces"][0]["bbox"], 0.2))
    alice_112 = jpeg(cv2.resize(crop_around(img11, golden["img11.jpg"]["faces"][0]["bbox"], 0.2), (112, 112), interpolation=cv2.INTER_AREA))
    squares = [cv2.imencode(".png", np.full((112, 112, 3), c, np.uint8))[1].tobytes() for c in ((128, 128, 128), (255, 255, 255), (255, 0, 0))]
    o, f = both("POST", "/recognize", json={"camera": "gate-2"})
    compare("recognize without bboxes", o, f)
    o, f = both("POST", "/recognize", json={"camera": "gate-3", "bboxes": []})
    compare("recognize with bboxes: []", o, f)
    body = ('{"camera": "gate-1", "frame": 18446744073709551616, "ts": "2026-12-01T21:00:00Z", "nested": {"a": [1, 2.5, null, true]}, "bboxes": ['
            + ", ".join([
                f'{{"bbox": [10, 20, 110, 140], "crop": "{b64(alice_crop)}", "track_id": 7}}',
                f'{{"crop": "{b64(alice_crop)}"}}',
                f'{{"bbox": [0, 0, 1, 1], "crop": "{b64(fixture("img12.jpg"))}"}}',
                f'{{"bbox": [0, 0, 1, 1], "crop": "{b64(fixture("t1.jpg"))}"}}',
                f'{{"bbox": [0, 0, 112, 112], "crop": "{b64(alice_112)}"}}',
            ] + [f'{{"bbox": [0, 0, 112, 112], "crop": "{b64(sq)}"}}' for sq in squares])
            + "]}")
    o, f = both("POST", "/recognize", data=body, headers={"content-type": "application/json"})
    compare("recognize: names, scores, bbox null, a 112x112 face, squares, several faces, extra fields", o, f,
            allowed_extra=(".track_id",))
    if o.status_code == 200 and f.status_code == 200:
        names = [(e["name"], round(e["similarity"], 3)) for e in o.json()["meta"]["bboxes"]]
        print("      original named:", names)
    if os.environ.get("FACES_DIR"):
        faces_set(os.environ["FACES_DIR"])
    o, f = both("GET", "/metadata")
    compare("GET /metadata after the recognitions", o, f, allowed_extra=(".track_id", ".src"))


def faces_set(faces_dir):
    """A loose crop of every labelled photo's first face, and the photos whole, 16 entries a request."""
    labels = json.load(open(os.path.join(faces_dir, "labels.json")))
    golden = json.load(open(os.path.join(faces_dir, "golden", "insightface_buffalo_sc_det320.json")))["images"]
    paths = sorted({p for ps in list(labels["identities"].values()) + list(labels["singletons"].values()) for p in ps})
    entries = []
    for p in paths:
        img = cv2.imread(os.path.join(faces_dir, p))
        g = golden.get(p)
        if img is None or not g or not g["faces"]:
            continue
        entries.append({"bbox": [round(v, 1) for v in g["faces"][0]["bbox"]], "crop": b64(jpeg(crop_around(img, g["faces"][0]["bbox"], 0.25))), "src": p})
        entries.append({"crop": b64(jpeg(img)), "src": p + " (whole)"})
    same, total = 0, 0
    for i in range(0, len(entries), 16):
        o, f = both("POST", "/recognize", json={"batch": i // 16, "bboxes": entries[i:i + 16]})
        compare(f"face set, request {i // 16 + 1}", o, f, allowed_extra=(".src",))
        if o.status_code == f.status_code == 200:
            for a, b in zip(o.json()["meta"]["bboxes"], f.json()["meta"]["bboxes"]):
                total += 1
                same += a["name"] == b["name"] and abs(a["similarity"] - b["similarity"]) <= SIM_TOL
    check(same == total, f"face set: {same} of {total} crops named alike with similarities within {SIM_TOL}")


def documented(O, F):
    """The rows of the README's table of differences that a request shows: each must differ as
    the table says (a table row that no longer holds is a failure too). Run after the files were
    compared, since some of these write crops only the original keeps."""
    def row(what, o, f, holds):
        try:
            ok = holds(o, f)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            ok = False
            print(f"      ({e!r})")
        if check(ok, f"documented difference, {what}", f"original {o.status_code} {o.text[:160]!r}, facerec {f.status_code} {f.text[:160]!r}"):
            note(f"as documented: {what} (original {o.status_code}, facerec {f.status_code})")

    jpg = fixture("img11.jpg")
    o, f = both("POST", "/calculate_average_embedding", data={"username": "alice"}, files=[("files", "img11.jpg", jpg)])
    def second(o, f):
        a, b = np.array(o.json()["embedding"]), np.array(f.json()["embedding"])
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        print(f"      second enrolment: template cosine {cos:.5f}; norms {np.linalg.norm(a):.4f} vs {np.linalg.norm(b):.4f}")
        return o.status_code == f.status_code == 200 and abs(np.linalg.norm(b) - 1) < 1e-3 and np.linalg.norm(a) < 0.9999
    row("a second enrolment: (old + new) / 2 unnormalised vs the weighted, normalised mean", o, f, second)
    o, f = both("POST", "/calculate_average_embedding", files=[("files", "img11.jpg", jpg)])
    row("enrolment without username: FastAPI 422 vs 400 invalid_request", o, f,
        lambda o, f: o.status_code == 422 and "detail" in o.json() and f.status_code == 400 and f.json()["code"] == "invalid_request")
    o, f = both("POST", "/recognize", data="{not json", headers={"content-type": "application/json"})
    row("a body that is not JSON: 500 vs 400 invalid_json", o, f, lambda o, f: o.status_code == 500 and f.status_code == 400 and f.json()["code"] == "invalid_json")
    o, f = both("POST", "/recognize", json=[1, 2])
    row("a body that is not an object: 500 vs 400 invalid_request", o, f, lambda o, f: o.status_code == 500 and f.status_code == 400)
    o, f = both("POST", "/recognize", json={"bboxes": "nope"})
    row("`bboxes` not a list: 500 vs 400 invalid_request", o, f, lambda o, f: o.status_code == 500 and f.status_code == 400)
    o, f = both("POST", "/recognize", json={"bboxes": [{"bbox": [1, 2, 3, 4]}, {"crop": b64(jpg)}]})
    row("an entry without crop: 500 for the whole request vs that entry's error", o, f,
        lambda o, f: o.status_code == 500 and f.status_code == 200 and f.json()["meta"]["bboxes"][0]["error"]["code"] == "invalid_request"
        and f.json()["meta"]["bboxes"][1]["name"] == "alice")
    o, f = both("POST", "/recognize", json={"bboxes": [{"crop": "!!not base64!!"}]})
    row("a crop that is not base64: 500 vs the entry's error", o, f,
        lambda o, f: o.status_code == 500 and f.json()["meta"]["bboxes"][0]["error"]["code"] == "invalid_base64")
    o, f = both("POST", "/recognize", json={"bboxes": [{"crop": b64(b"plain text")}]})
    row("a crop that is not an image: Unknown 1 and 0.0 in both, plus facerec's error", o, f,
        lambda o, f: [(e["name"], e["similarity"]) for e in o.json()["meta"]["bboxes"]] == [("Unknown 1", 0.0)]
        and f.json()["meta"]["bboxes"][0]["name"] == "Unknown 1" and f.json()["meta"]["bboxes"][0]["error"]["code"] == "invalid_image")
    o, f = both("POST", "/recognize", json={"status": "forged", "bboxes": []})
    row("a client-sent top-level status: kept in meta vs dropped", o, f,
        lambda o, f: o.json()["meta"]["status"] == "forged" and "status" not in f.json()["meta"])
    o, f = both("POST", "/recognize", data='{"x": 1e400, "bboxes": []}', headers={"content-type": "application/json"})
    row("a number beyond float range (1e400): the original cannot answer it (500) vs echoed", o, f,
        lambda o, f: o.status_code == 500 and f.status_code == 200 and '"x":1e+400' in f.text)
    o, f = both("POST", "/recognize", data='{"note": "\\ud800", "bboxes": []}', headers={"content-type": "application/json"})
    row("a lone UTF-16 surrogate escape in a string: 500 vs 400 invalid_json", o, f,
        lambda o, f: o.status_code == 500 and f.status_code == 400 and f.json()["code"] == "invalid_json")
    o, f = both("POST", "/recognize", json={"bboxes": [{"bbox": [1, 2, 3, 4], "crop": b64(jpg), "track_id": 7}]})
    row("an entry's other fields: dropped vs echoed", o, f,
        lambda o, f: "track_id" not in o.json()["meta"]["bboxes"][0] and f.json()["meta"]["bboxes"][0]["track_id"] == 7)
    o, f = both("GET", "/no/such/route")
    row("an unknown route: 404 FastAPI detail vs 404 not_found", o, f,
        lambda o, f: o.status_code == f.status_code == 404 and "detail" in o.json() and f.json()["code"] == "not_found")
    o, f = both("GET", "/recognize")
    row("a wrong method: 405 FastAPI detail vs 405 method_not_allowed", o, f,
        lambda o, f: o.status_code == f.status_code == 405 and f.json()["code"] == "method_not_allowed")


def compare_files(seed_dir, fr_dir):
    def lines(path):
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    ol, fl = lines(os.path.join(seed_dir, "logs.txt")), lines(os.path.join(fr_dir, "logs.txt"))
    check(len(ol) == len(fl), "logs.txt: as many lines", f"{len(ol)} vs {len(fl)}")
    # Documented: an entry whose crop is not an image is logged without its bytes (crop_omitted).
    omitted = 0
    for a, b in zip(ol, fl):
        for ea, eb in zip(a.get("bboxes") or [], b.get("bboxes") or []):
            if isinstance(eb, dict) and "crop_omitted" in eb and isinstance(ea, dict) and eb.get("crop") is None:
                eb["crop"] = ea.get("crop")
                omitted += 1
    if omitted:
        note(f"as documented: logs.txt leaves out {omitted} crop(s) that are no image (crop_omitted)")
    bad = [f"line {i + 1}: {d[0]}" for i, (a, b) in enumerate(zip(ol, fl)) for d in [diff(a, b, "$")] if d]
    check(not bad, "logs.txt: every line the same values", "; ".join(bad[:3]))
    op = sorted(os.listdir(os.path.join(seed_dir, "photo")))
    fp = sorted(os.listdir(os.path.join(fr_dir, "photo")))
    stem = lambda n: n.rsplit(".", 1)[0]
    check(sorted(map(stem, op)) == sorted(map(stem, fp)), "crop files: the same names and counters",
          f"only the original: {sorted(set(map(stem, op)) - set(map(stem, fp)))[:5]}, only facerec: {sorted(set(map(stem, fp)) - set(map(stem, op)))[:5]}")
    exts = sorted({n.rsplit(".", 1)[1] for n in fp})
    note(f"crop files: the original writes .png for every crop; facerec the real format's extension ({', '.join(exts)})")


if __name__ == "__main__":
    sys.exit(main())
