"""``ncaudit torchrun``: torchrun, with a failed run said in one line and its ranks' exit code."""

from __future__ import annotations

import logging

import typer

from ncaudit.cli._app import command, fail


@command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def torchrun(ctx: typer.Context) -> None:
    """Launch ncaudit on several ranks exactly as torchrun does (the same arguments), e.g.
    `ncaudit torchrun --nproc_per_node=8 -m ncaudit extract --model M --pretrained --data D --out X.h5`.

    Plain torchrun reports any failed rank with a traceback of its own launcher and exits 1; here a failed run ends
    with the ranks' one-line error and their exit code (2 for bad input, 130 / 143 when interrupted); torchrun's own
    log lines are silenced. A rank that fails otherwise (a crash) is named in one line with its exit code.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        args = parse_args(list(ctx.args))
    except SystemExit as exc:  # argparse printed the usage error
        raise typer.Exit(code=2 if exc.code else 0) from None
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = int(failure.exitcode)
        if code in (2, 130, 143):  # the rank said why in one line (rank 0 prints a failing rank's message)
            raise typer.Exit(code=code) from None
        what = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        fail(f"rank {rank} failed ({what}); its output above says why", code=code if code > 0 else 1)
