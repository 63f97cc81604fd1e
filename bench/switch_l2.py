# Guest-to-guest layer-2 forwarding through `usernet serve --listen unix:S,framing=u16le`:
# client A writes N 1514-byte frames to client B's MAC (batched writes), B reads them.
# Usage: python3 bench/switch_l2.py SOCKET N (see bench/switch-l2.sh).
import socket, struct, sys, threading, time
path = sys.argv[1]; total_frames = int(sys.argv[2])
A = bytes([2,0,0,0,0,0xa]); B = bytes([2,0,0,0,0,0xb])
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path); return s
a, b = conn(), conn()
hello = lambda src: struct.pack('<H', 60) + (b'\xff'*6 + src + b'\x88\xb5').ljust(60, b'\0')
a.sendall(hello(A)); b.sendall(hello(B))
time.sleep(0.5)
frame = (B + A + b'\x88\xb5').ljust(1514, b'x')
rec = struct.pack('<H', len(frame)) + frame
batch = rec * 500
want = total_frames * len(rec)
got = 0
# drain the hellos B may get (A's broadcast)
b.settimeout(10)
def reader():
    global got
    while got < want:
        d = b.recv(1 << 20)
        if not d: break
        got += len(d)
t = threading.Thread(target=reader); 
t0 = time.time(); t.start()
for _ in range(total_frames // 500):
    a.sendall(batch)
t.join()
dt = time.time() - t0
print(f"{total_frames} frames of 1514 B in {dt:.2f} s: {total_frames/dt/1e3:.0f} kframes/s, {got*8/dt/1e9:.2f} Gbit/s")
