"""jaxgpt's benchmark suite: `python -m benchmarks [--quick] [--json OUT] [--markdown OUT] [--plot OUT.png]`.

Generation, forward, training-step, porting and compile timings for jaxgpt and torch (the
notebook's loop and a tuned torch baseline), interleaved in one process, with the device's
measured limits and the cross-framework parity figures. See benchmarks/__main__.py.
"""
