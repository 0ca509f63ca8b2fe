"""The ``tether controller`` flags that say how to reach etcd beyond ``--etcd``."""

from __future__ import annotations

from collections.abc import Callable

import click

__all__ = ["etcd_options"]

# flag name -> (ControllerConfig field, help); each also reads TETHER_<FLAG> from the env.
_FLAGS = {
    "etcd-ca": ("etcd_ca", "PEM CA that signed etcd's certificates (TLS to etcd)."),
    "etcd-cert": ("etcd_cert", "PEM client certificate for etcd (with --etcd-key)."),
    "etcd-key": ("etcd_key", "PEM key of --etcd-cert."),
    "etcd-user": ("etcd_user", "etcd user, when etcd has auth enabled."),
    "etcd-password-file": ("etcd_password_file", "File whose first line is the etcd password."),
}


def etcd_options(command: Callable) -> Callable:
    """Add the etcd TLS and auth flags; they reach the command as ``etcd_*`` keywords."""
    for flag, (name, help_text) in reversed(_FLAGS.items()):
        env = "TETHER_" + flag.upper().replace("-", "_")
        command = click.option(
            f"--{flag}",
            name,
            envvar=env,
            default=None,
            callback=lambda _ctx, _param, value: value or "",
            type=click.Path(exists=True, dir_okay=False) if flag != "etcd-user" else str,
            help=f"{help_text} (env {env})",
        )(command)
    return command
