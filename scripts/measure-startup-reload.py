#!/usr/bin/env python3
"""Start-up and hot-reload latency of the built host, medians of several runs.

Start-up: from exec to the `plugins ready` line, with the compile cache cold
(empty) and warm. Reload: from the rename of a new plugin version into the
watched directory to the first command whose event names the new version
(the watch's 300 ms debounce included), with the new version's compiled code
absent from the cache (cold) and present (warm).

    make plugins test-plugins host && python3 scripts/measure-startup-reload.py
"""
import json, os, shutil, statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "debug", "rehydra")
V1 = os.path.join(TARGET, "plugins", "bank-account.wasm")
V2 = os.path.join(TARGET, "test-plugins", "bank-account-withdrawal-fee.wasm")
RUNS = int(os.environ.get("RUNS", "5"))

def start(d, plugins):
    t0 = time.perf_counter()
    p = subprocess.Popen([BIN, "run", "--plugins", os.path.join(d, "plugins"), "--store", "memory://",
                          "--cache-dir", os.path.join(d, "cache"), "--http", "127.0.0.1:0", "--grpc", "off"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = None
    for line in p.stdout:
        if line.startswith("listening on "):
            url = line.split()[-1]
        elif line.strip() == "plugins ready" and url is not None:
            return p, url, time.perf_counter() - t0
    raise SystemExit("the host did not start")

def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)

def get(url):
    with urllib.request.urlopen(url) as r:
        return json.load(r)

def startup(cache_warm):
    d = tempfile.mkdtemp()
    os.makedirs(os.path.join(d, "plugins"))
    for name in ("bank-account", "users", "faulty"):
        shutil.copy(os.path.join(TARGET, "plugins", name + ".wasm"), os.path.join(d, "plugins"))
    if cache_warm:
        p, _, _ = start(d, None); p.kill(); p.wait()
    p, _, took = start(d, None)
    p.kill(); p.wait(); shutil.rmtree(d)
    return took

def reload(cache_warm):
    d = tempfile.mkdtemp()
    os.makedirs(os.path.join(d, "plugins"))
    shutil.copy(V1, os.path.join(d, "plugins", "bank-account.wasm"))
    if cache_warm:
        # Compile v2 into the cache first, with another host on the same cache.
        shutil.copy(V2, os.path.join(d, "plugins", "bank-account.wasm"))
        p, _, _ = start(d, None); p.kill(); p.wait()
        shutil.copy(V1, os.path.join(d, "plugins", "bank-account.wasm"))
    p, base, _ = start(d, None)
    post(f"{base}/v1/aggregates/bank-account/a/commands/open", {"owner": "Ada"})
    post(f"{base}/v1/aggregates/bank-account/a/commands/deposit", {"amount": 10_000_000})
    old = get(f"{base}/v1/plugins")["plugins"][0]["hash"]
    tmp = os.path.join(d, "plugins", "bank-account.wasm.tmp")
    shutil.copy(V2, tmp)
    t0 = time.perf_counter()
    os.rename(tmp, os.path.join(d, "plugins", "bank-account.wasm"))
    while True:
        out = post(f"{base}/v1/aggregates/bank-account/a/commands/withdraw", {"amount": 1})
        if len(out.get("events", [])) == 2:  # v2 charges a fee
            took = time.perf_counter() - t0
            break
        if time.perf_counter() - t0 > 60:
            raise SystemExit(f"the new version never served; last answer: {out}")
    assert get(f"{base}/v1/plugins")["plugins"][0]["hash"] != old
    p.kill(); p.wait(); shutil.rmtree(d)
    return took

def median_ms(f, *a):
    return statistics.median(f(*a) for _ in range(RUNS)) * 1000

print(f"| measurement (median of {RUNS}) | ms |")
print("|---|---|")
print(f"| start-up, 3 plugins, compile cache cold | {median_ms(startup, False):.0f} |")
print(f"| start-up, 3 plugins, compile cache warm | {median_ms(startup, True):.0f} |")
print(f"| reload: rename -> first command on the new version, cache cold | {median_ms(reload, False):.0f} |")
print(f"| reload: rename -> first command on the new version, cache warm | {median_ms(reload, True):.0f} |")
