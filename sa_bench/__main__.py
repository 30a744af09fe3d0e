"""`python -m sa_bench` / `sa-bench`: run the model × sparse × benchmark matrix."""

import sys

from sa_bench.launch.fastpath import resume_if_all_done


def main() -> None:
    if resume_if_all_done(sys.argv[1:]):  # an all-finished sweep: no need to start Hydra
        return
    from sa_bench.job import run_job
    from sa_bench.launch.hydra_app import hydra_main

    hydra_main(run_job)()


if __name__ == "__main__":
    main()
