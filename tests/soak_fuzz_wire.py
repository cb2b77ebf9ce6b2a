"""Soak: a long fuzz of the frame reader: the properties of tests/unit/core/test_fuzz_wire.py,
run for minutes instead of seconds.

Each input picks a reader geometry, a chunking and a byte stream (random, or a
valid stream of frames with mutations); the compiled reader must produce exactly
the frames the pure-Python reference parser finds, or raise ProtocolError where
the reference does, and never offer a receive window larger than its maximum
frame size. Any other exception, a mismatch or a hang is a finding.

    python tests/soak_fuzz_wire.py                       # atheris if installed, else hypothesis
    python tests/soak_fuzz_wire.py --seconds 600
    python tests/soak_fuzz_wire.py --engine hypothesis --examples 200000
    python tests/soak_fuzz_wire.py --engine atheris -- -runs=1000000   # extra libFuzzer flags

atheris (`pip install atheris`) mutates with coverage feedback from the Python
side (harness and reference); hypothesis generates structured streams.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "unit", "core"))

import test_fuzz_wire as props  # noqa: E402  (the reference parser and reader driver)

from fastdist._core import _wire  # noqa: E402
from fastdist.exceptions import ProtocolError  # noqa: E402


def check_one(data: bytes, cuts: list[int], max_frame: int, max_nbufs: int, staging: int,
              threshold: int) -> None:
    geometry = {"max_frame_nbytes": max_frame, "max_nbufs": max_nbufs,
                "staging_nbytes": staging, "direct_threshold": threshold}
    try:
        reader = _wire.FrameReader(**geometry)
    except ValueError:
        return
    got = props.run_reader(reader, data, cuts, max(max_frame, staging))
    want = props.reference_parse(data, max_frame, max_nbufs)
    if got != want:
        raise AssertionError(f"reader {got!r} != reference {want!r} for geometry {geometry}, "
                             f"cuts {cuts}, data {data!r}")


# -- atheris ------------------------------------------------------------------------------


def run_atheris(seconds: float, extra: list[str]) -> None:
    import atheris

    def one_input(buf: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(buf)
        max_frame = fdp.PickValueInList([64, 1000, 1 << 12, 1 << 20])
        max_nbufs = fdp.ConsumeIntInRange(1, 16)
        staging = fdp.ConsumeIntInRange(16, 8192)
        threshold = fdp.ConsumeIntInRange(1, 4096)
        cuts = [fdp.ConsumeIntInRange(0, 1 << 14) for _ in range(fdp.ConsumeIntInRange(0, 8))]
        if fdp.ConsumeBool():
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
        else:
            data = b""
            for _ in range(fdp.ConsumeIntInRange(1, 4)):
                body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000))
                bufs = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 700))
                        for _ in range(fdp.ConsumeIntInRange(0, 4))]
                data += props.encode((fdp.ConsumeIntInRange(0, 255), 0, 0, 1, 1, body, bufs))
            data = bytearray(data)
            for _ in range(fdp.ConsumeIntInRange(0, 4)):
                if data:
                    data[fdp.ConsumeIntInRange(0, len(data) - 1)] = fdp.ConsumeIntInRange(0, 255)
            data = bytes(data)
        check_one(data, cuts, max_frame, max_nbufs, staging, threshold)

    argv = [sys.argv[0], f"-max_total_time={int(seconds)}", "-timeout=10", *extra]
    # Coverage feedback from the reference parser and the reader driver (the compiled
    # reader itself is not instrumented); instrumenting everything loaded takes minutes.
    props.reference_parse = atheris.instrument_func(props.reference_parse)
    props.run_reader = atheris.instrument_func(props.run_reader)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


# -- hypothesis ---------------------------------------------------------------------------


def run_hypothesis(seconds: float, examples: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    data_st = st.one_of(st.binary(max_size=4096), props.streams, props.mutated_streams())
    geometry = st.tuples(st.sampled_from([64, 1000, 1 << 12, 1 << 20]), st.integers(1, 16),
                         st.integers(16, 8192), st.integers(1, 4096))
    deadline = time.monotonic() + seconds
    count = [0]

    @settings(max_examples=min(examples, 2000), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=data_st, cuts=props.cuts_st, geo=geometry)
    def prop(data, cuts, geo):
        count[0] += 1
        check_one(data, cuts, *geo)

    # Rounds of fresh random examples until the time or the example budget runs out.
    while time.monotonic() < deadline and count[0] < examples:
        prop()
        print(f"hypothesis: {count[0]} inputs checked", flush=True)
    print(f"hypothesis: {count[0]} inputs checked, no finding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--examples", type=int, default=1_000_000,
                        help="hypothesis: most examples to try (time-limited by --seconds)")
    parser.add_argument("extra", nargs="*", help="libFuzzer flags for atheris (after --)")
    args = parser.parse_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    # A sanity check that the harness can fail: a reader and reference that disagree.
    assert props.reference_parse(struct.pack("<BBHIIIQQ", 1, 0, 0, 0, 0, 0, 0, 0), 10, 1) == (
        [(1, 0, 0, 0, 0, b"", [])], False)
    try:
        _wire.FrameReader(max_frame_nbytes=10).feed(_wire.pack_prelude(1, 0, 0, 0, 0, 11))
        raise SystemExit("the reader accepted a frame above its maximum")
    except ProtocolError:
        pass
    print(f"fuzzing the frame reader with {engine} for {args.seconds:g} s", flush=True)
    if engine == "atheris":
        run_atheris(args.seconds, args.extra)
    else:
        run_hypothesis(args.seconds, args.examples)


if __name__ == "__main__":
    main()
