"""The one device call (issue 24, 2026-12-04, the lent H200) that trained the shipped flow artifacts.

    OUT=/tmp/out python tools/flow_sweep.py            # DEV=cpu SMOKE=1 ONLY=A: a quick check on a CPU

It runs the repo's own CLIs: the classifier (``python -m cdlab.flow.classifier``) beside five teacher variants
(``python -m cdlab.flow.train_teacher``, each capped at 3.3 minutes, all sharing the GPU), scores each teacher at
50 Euler steps with CFG 2, 3 and 5 (``cdlab.flow.evaluate.score``), takes the best of the variants that fit the
CPU budget, distils students from it (``python -m cdlab.flow.distill``, each capped at 70 s) and evaluates them
(``python -m cdlab.flow.evaluate``). $OUT receives teachers.json, results.json, sweep.log and tars of the weights
and logs. The data: the idx files as ``*.xz`` in ``.gpu/`` (the device machine has no Debian package), else
``$CDLAB_FASHION_MNIST``. docs/flow.md has what it printed.
"""
import json, lzma, os, shutil, subprocess, sys, tarfile, textwrap, time
from pathlib import Path

OUT = Path(os.environ["OUT"])
DEV = os.environ.get("DEV", "cuda")
SMOKE = os.environ.get("SMOKE") == "1"
W = Path("/tmp/flow-smoke" if SMOKE else "/tmp/flow")
shutil.rmtree(W, ignore_errors=True)  # a warm device machine keeps /tmp between calls
W.mkdir(parents=True, exist_ok=True)
DATA = Path("/tmp/fm")
DATA.mkdir(exist_ok=True)
T0 = time.time()
LOG = open(OUT / "sweep.log", "a")
LOGS = W / "logs"
LOGS.mkdir(exist_ok=True)


def log(msg):
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.write(line + "\n"); LOG.flush()


for f in Path(".gpu").glob("*.xz"):
    (DATA / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
if not any(DATA.iterdir()) and os.environ.get("CDLAB_FASHION_MNIST"):
    DATA = Path(os.environ["CDLAB_FASHION_MNIST"])
env = dict(os.environ, CDLAB_FASHION_MNIST=str(DATA), PYTHONUNBUFFERED="1", PYTHONPATH=".")
log("data ready " + " ".join(p.name for p in DATA.iterdir()))

py = sys.executable


def start(name, args):
    f = open(LOGS / f"{name}.log", "w")
    log(f"start {name}: {' '.join(args)}")
    return name, subprocess.Popen([py, *args], env=env, stdout=f, stderr=subprocess.STDOUT)


def wait(procs):
    for name, p in procs:
        rc = p.wait()
        log(f"done {name}: rc {rc}")


# name: (D, batch, epochs, epoch_images, lr); "cheap" = fits 60 CPU minutes by the 0.5-0.65 s/step at D32/B128
VARIANTS = {
    "A": (32, 128, 10, 60000, 2e-3, True),
    "B": (32, 128, 14, 60000, 2e-3, False),
    "C": (48, 128, 7, 60000, 2e-3, False),
    "E": (32, 64, 10, 60000, 2e-3, True),
    "F": (32, 128, 10, 60000, 5e-3, True),
}
if os.environ.get("ONLY"):
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in os.environ["ONLY"]}
procs = [start("classifier", ["-m", "cdlab.flow.classifier", "--out", str(W / "classifier"), "--epochs", "1" if SMOKE else "8", "--device", DEV, "--train-images", "2000" if SMOKE else "60000"])]
for v, (d, b, e, ei, lr, _) in VARIANTS.items():
    procs.append(start(f"teacher-{v}", ["-m", "cdlab.flow.train_teacher", "--minutes", "0.3" if SMOKE else "3.3", "--out", str(W / f"teacher-{v}"),
                                        "--device", DEV, "--num-hiddens", str(d), "--batch-size", str(b),
                                        "--num-epochs", str(e), "--epoch-images", str(ei), "--lr", str(lr)]))
wait(procs)


def pack_teachers():
    with tarfile.open(OUT / "teachers.tar", "w") as t:
        for v in VARIANTS:
            d = W / f"teacher-{v}"
            for f in ("unet.safetensors", "state.json", "metrics.jsonl", "samples-epoch1.png", "samples-epoch5.png", "samples-epoch10.png"):
                if (d / f).exists() and not (f == "unet.safetensors" and v in "CD"):
                    t.add(d / f, f"teacher-{v}/{f}")
        if (W / "classifier").exists():
            t.add(W / "classifier", "classifier")
    log("packed teachers")


pack_teachers()
try:
    # teacher FIDs at 50 steps, CFG 2/3/5
    code = r'''
    import json, sys, torch
    from cdlab.flow import evaluate as ev
    from cdlab.flow.classifier import load_classifier, as_feature
    from cdlab.flow.data import load_fashion_mnist
    from cdlab.flow.train_teacher import load_unet, _read_state
    W = sys.argv[1]
    clf = load_classifier(W + "/classifier", sys.argv[2])
    ref = as_feature(clf)(load_fashion_mnist("test")[0])
    tr = as_feature(clf)(load_fashion_mnist("train")[0][:10000])
    from cdlab.metrics import fid_of_features
    out = {"train_vs_test_fid": round(fid_of_features(tr, ref), 2), "teachers": {}}
    z, y = ev.noise(int(sys.argv[3]))
    for v in sys.argv[4:]:
        try:
            u = load_unet(f"{W}/teacher-{v}").to(sys.argv[2])
            cfg, prog = _read_state(__import__("pathlib").Path(f"{W}/teacher-{v}"))
        except Exception as e:
            print(v, e); continue
        res = {"progress": prog}
        for g in (2.0, 3.0, 5.0):
            res[str(g)] = ev.score(ev.sample_column(u, "teacher", z, y, 50, guidance=g), y, clf, ref)
        out["teachers"][v] = res
        print(v, json.dumps(res), flush=True)
    json.dump(out, open(W + "/teachers.json", "w"), indent=1)
    '''
    subprocess.run([py, "-c", textwrap.dedent(code), str(W), DEV, "200" if SMOKE else "2000", *VARIANTS], env=env, stdout=open(LOGS / "teachers.log", "w"), stderr=subprocess.STDOUT)
    res = json.loads((W / "teachers.json").read_text())
    (OUT / "teachers.json").write_text(json.dumps(res, indent=1))
    best = min(((r[g]["fid"], v, float(g)) for v, r in res["teachers"].items() if VARIANTS[v][5] for g in ("2.0", "3.0", "5.0")))
    log(f"best cheap teacher: {best}")
    _, bv, bg = best
    teacher = str(W / f"teacher-{bv}")

    S = W / "students"
    common = ["-m", "cdlab.flow.distill", "--teacher", teacher, "--root", str(S), "--device", DEV, "--guidance", str(bg), "--max-seconds", "10" if SMOKE else "70"]
    procs = [start("cd-1", [*common, "--method", "cd", "--num-boundaries", "1", "--sample-steps", "1", "--steps", "6000", "--name", "fashion-cd-1"]),
             start("cd-4", [*common, "--method", "cd", "--num-boundaries", "1", "--sample-steps", "4", "--steps", "6000", "--name", "fashion-cd-4"]),
             start("mbcd-4", [*common, "--method", "cd", "--num-boundaries", "4", "--sample-steps", "4", "--steps", "6000", "--name", "fashion-mbcd-4"]),
             start("reflow", [*common, "--method", "reflow", "--pairs", "300" if SMOKE else "30000", "--steps", "6000", "--lr", "2e-3", "--name", "fashion-reflow"])]
    wait(procs)
    procs = [start("reflow-1", [*common, "--method", "reflow", "--pairs", "300" if SMOKE else "30000", "--reflow-times", "zero", "--sample-steps", "1",
                                "--steps", "3000", "--init", "fashion-reflow", "--name", "fashion-reflow-1"])]
    wait(procs)
    students = [p.name for p in sorted(S.iterdir()) if (p / "card.json").exists()]
    subprocess.run([py, "-m", "cdlab.flow.evaluate", "--teacher", teacher, "--classifier", str(W / "classifier"), "--n", "200" if SMOKE else "2000", "--device", DEV,
                    "--guidance", str(bg), "--adapters", str(S), "--out", str(OUT / "evaluation"), *sum([["--student", s] for s in students], [])],
                   env=env, stdout=open(LOGS / "evaluate.log", "w"), stderr=subprocess.STDOUT)

    log("evaluated")
except Exception:
    import traceback
    log("FAILED: " + traceback.format_exc())
finally:
    if (W / "students").exists():
        with tarfile.open(OUT / "rest.tar", "w") as t:
            t.add(W / "students", "students")
        log("packed students")
    with tarfile.open(OUT / "logs.tar", "w") as t:
        t.add(LOGS, "logs")
