"""`python -m sa_bench` / `sa-bench`: run the model × sparse × benchmark matrix."""

import sys


def main() -> None:
    try:
        from sa_bench.job import run_job
        from sa_bench.launch.hydra_app import hydra_main, sweep_dependent_overrides

        sys.argv = sweep_dependent_overrides(sys.argv)
        hydra_main(run_job)()
    except KeyboardInterrupt:
        print("\nInterrupted. Finished cells are kept; run the same command again to resume.",
              file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
