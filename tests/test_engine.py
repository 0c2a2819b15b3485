"""The engine's distributed set-up for a process started alone (no torchrun, no PyTorchJob)."""
import os
import socket
import subprocess
import sys

SCRIPT = """
import socket, sys
from dlmctl.trainer import engine

taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
busy = taken.getsockname()[1]
ports = iter([busy])  # the first port chosen is taken by someone else meanwhile; the next is free
def free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

engine._free_port = lambda: next(ports, None) or free()
world = engine.init_distributed()
print(world.rank, world.world_size, busy != int(engine.os.environ["MASTER_PORT"]))
"""


def test_a_process_alone_finds_another_rendezvous_port_when_its_first_is_taken():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "0 1 True"
