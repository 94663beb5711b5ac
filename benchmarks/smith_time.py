"""Wall time of the main job, `minifast smith`, with its defaults (issue 7's target: under 5 minutes on a 2-core CPU).

Runs the command in a fresh temporary run folder (so nothing is skipped), then once more in the same folder (the
resumed re-run should train nothing), and prints both times against the 300 s budget.

    python benchmarks/smith_time.py            # the default run (about 3 minutes on 2 cores)
    python benchmarks/smith_time.py --quick    # the tests' tiny settings (seconds)
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
BUDGET = 300.


def run(out, quick):
    cmd = [sys.executable, '-m', 'minifast', 'smith', '--quiet', '--out', out] + (['--quick'] if quick else [])
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONPATH': os.pathsep.join(filter(None, [ROOT,
                                                                                         os.environ.get('PYTHONPATH')]))}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f'minifast smith failed ({p.returncode}):\n{p.stdout}\n{p.stderr}')
    last = [ln for ln in p.stdout.splitlines() if ln.startswith('smith:')]
    return dt, last


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__)
    a.add_argument('--quick', action='store_true', help='the tiny settings the tests use')
    args = a.parse_args(argv)
    import torch
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs visible, {torch.get_num_threads()} torch threads')
    with tempfile.TemporaryDirectory() as out:
        first, lines = run(out, args.quick)
        for ln in lines:
            if ln.startswith(('smith: 6/7', 'smith: 10 grid', 'smith: 3/7')) or 'grid run(s) trained' in ln:
                print('  ' + ln)
        again, lines2 = run(out, args.quick)
        print('  ' + next((ln for ln in lines2 if 'grid run(s) trained' in ln), ''))
    print(f'first run {first:.1f} s ({first / BUDGET:.2f}x the {BUDGET:.0f} s budget); re-run in the same folder '
          f'{again:.1f} s')
    print(f"RESULT minifast smith{' --quick' if args.quick else ''}: {first:.1f} s "
          f"({'within' if first < BUDGET else 'OVER'} the 5-minute target)")


if __name__ == '__main__':
    main()
