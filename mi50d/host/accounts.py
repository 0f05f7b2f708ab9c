"""Which account instances run as: the configured `user`, with the groups a ROCm process needs."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from dataclasses import dataclass

from mi50d.config import DAEMON_FILE, Config, ConfigError

ROCM_GROUPS = ("render", "video")


@dataclass(frozen=True)
class Account:
    """Who a child runs as: ids for the kernel, name and home for the child's environment."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/"

    def environment(self) -> dict[str, str]:
        """HOME, USER and LOGNAME of the account (ROCm and HIP keep caches under HOME)."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


class AccountError(Exception):
    pass


def account_for(config: Config) -> Account | None:
    """The account of `config`'s instances, resolved once when the daemon adopts a configuration
    (start or reload); a user that does not exist rejects it like any other bad key."""
    try:
        return resolve_account(config.daemon.user)
    except AccountError as exc:
        raise ConfigError([f"{DAEMON_FILE}: user: {exc}"]) from None


def resolve_account(user: str) -> Account | None:
    """The account to run children as, or None to keep the daemon's own (when not root).

    Only root can switch; an unprivileged daemon runs its children as itself. `user = "root"`
    in mi50d.toml is the explicit opt-in to run llama-server as root.
    """
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise AccountError(
            f"user {user!r} does not exist; create it (the mi50d package does: "
            f"adduser --system --group {user}) or set `user` in mi50d.toml"
        ) from None
    groups = {pw.pw_gid}
    groups.update(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)
    for name in ROCM_GROUPS:
        with contextlib.suppress(KeyError):
            groups.add(grp.getgrnam(name).gr_gid)
    return Account(name=user, uid=pw.pw_uid, gid=pw.pw_gid, groups=tuple(sorted(groups)),
                   home=pw.pw_dir)
