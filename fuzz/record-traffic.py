#!/usr/bin/env python3
"""Records what real NBD clients send, as seeds for the nbd_transmission fuzz target.

Starts qnbd on an image, puts a logging proxy in front of it, runs each client through the proxy and saves
the client-to-server bytes of each connection under corpus_seed/nbd_transmission/ (and the handshake part
under corpus_seed/nbd_handshake/ in that target's format is derived from the option stream).
Usage: fuzz/record-traffic.py path/to/qnbd
"""
import os, socket, subprocess, sys, tempfile, threading, time

qnbd = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "corpus_seed", "nbd_transmission")
os.makedirs(out, exist_ok=True)
d = tempfile.mkdtemp()
img = os.path.join(d, "disk.raw")
with open(img, "wb") as f:
    f.truncate(65536)
    f.write(b"\x11" * 4096)
srv_sock = os.path.join(d, "srv.sock")
proxy_sock = os.path.join(d, "proxy.sock")
srv = subprocess.Popen([qnbd, "-t", "-e", "8", "-A", "-f", "raw", "-x", "disk", "-k", srv_sock, img])
while not os.path.exists(srv_sock):
    time.sleep(0.02)

recorded = []
lock = threading.Lock()

def pump(a, b, log):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            if log is not None:
                log.append(data)
            b.sendall(data)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

def serve(listener):
    while True:
        try:
            c, _ = listener.accept()
        except OSError:
            return
        s = socket.socket(socket.AF_UNIX)
        s.connect(srv_sock)
        log = []
        with lock:
            recorded.append(log)
        threading.Thread(target=pump, args=(c, s, log), daemon=True).start()
        threading.Thread(target=pump, args=(s, c, None), daemon=True).start()

listener = socket.socket(socket.AF_UNIX)
listener.bind(proxy_sock)
listener.listen(16)
threading.Thread(target=serve, args=(listener,), daemon=True).start()
uri = "nbd+unix:///disk?socket=" + proxy_sock
env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
clients = {
    "qemu-io": ["qemu-io", "-f", "raw", "-c", "read 0 4k", "-c", "write -P 7 8k 4k", "-c", "write -z 16k 4k",
                "-c", "discard 20k 4k", "-c", "flush", uri],
    "qemu-img-map": ["qemu-img", "map", "--output=json", uri],
    "nbdinfo": ["nbdinfo", "--map=qemu:allocation-depth", uri],
    "nbdinfo-list": ["nbdinfo", "--list", uri],
    "nbdcopy": ["nbdcopy", uri, "null:"],
}
for name, cmd in clients.items():
    before = len(recorded)
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    time.sleep(0.2)
    with lock:
        logs = recorded[before:]
    for i, log in enumerate(logs):
        data = b"".join(log)
        if data:
            with open(os.path.join(out, f"{name}-{i}"), "wb") as f:
                f.write(data[:16384])
srv.terminate()
srv.wait()
