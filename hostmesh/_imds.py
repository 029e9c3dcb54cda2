"""EC2 placement from the instance metadata service, IMDSv2 only.

``az = "auto"`` / ``region = "auto"`` in ``agent.toml`` are resolved once, at
agent start, by :func:`resolve_placement`:

1. ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``
   gives a session token (IMDSv2; IMDSv1's tokenless GETs are refused by
   instances with ``HttpTokens=required``, the AWS-recommended setting);
2. ``GET /latest/meta-data/placement/availability-zone`` and ``.../region``
   with ``X-aws-ec2-metadata-token``.

Every request has its own deadline (``ec2.imds_timeout``, 1 s) and the whole
sequence is tried ``ec2.imds_attempts`` times (2), so a host without IMDS
delays the start by at most attempts x 3 x timeout (6 s). Answers are capped
in size and must be DNS labels, since the AZ becomes one (``<az>.web.svc.mesh``).

When IMDS cannot be read the agent still starts, with a warning naming the
reason and no AZ/region (``""``), unless ``ec2.imds_required`` is true: on a
fleet, a host whose proxy and DNS are up but whose traffic ignores zones is a
far smaller incident than a host with no mesh at all (the design's static
stability), and the warning plus ``/v1/agent/self`` show what happened.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ._config import AgentConfig, Ec2Config
from ._errors import ImdsError
from ._log import get_logger

if TYPE_CHECKING:
    import httpx  # imported when IMDS is asked: an agent without "auto" never loads it

__all__ = [
    "AUTO",
    "MAX_ANSWER",
    "MAX_TOKEN",
    "Placement",
    "fetch_placement",
    "resolve_placement",
]

log = get_logger("hostmesh.imds")

#: The config value that asks for IMDS.
AUTO = "auto"
#: Seconds the session token lives; we use it for two GETs right away.
TOKEN_TTL = 60
#: Bytes of a token we accept. AWS tokens are ~56 base64 characters; the bound
#: keeps a hostile endpoint from making us hold or send a huge header.
MAX_TOKEN = 1024
#: Bytes of a placement answer we accept ("eu-west-1a" is 10; the longest
#: Local/Wavelength Zone names are about 30). Longer answers are refused.
MAX_ANSWER = 256
#: An AZ or region must be one lowercase DNS label (RFC 1035 section 2.3.1).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: Visible ASCII only: a token goes back into a request header.
_TOKEN = re.compile(r"[\x21-\x7e]+")

TOKEN_PATH = "/latest/api/token"
AZ_PATH = "/latest/meta-data/placement/availability-zone"
REGION_PATH = "/latest/meta-data/placement/region"


@dataclass(frozen=True)
class Placement:
    """Where this instance runs."""

    az: str  # e.g. eu-west-1a
    region: str  # e.g. eu-west-1


async def fetch_placement(
    config: Ec2Config, *, transport: httpx.AsyncBaseTransport | None = None
) -> Placement:
    """Read the AZ and region from IMDSv2.

    Args:
        config: endpoint, per-request timeout and attempts.
        transport: an httpx transport (tests may inject one); default: a plain
            TCP one that ignores proxy environment variables (IMDS is link-local:
            a proxy must never see the token).

    Raises:
        ImdsError: every attempt failed; the message gives the last reason.
    """
    import httpx

    last = "no attempt"
    async with httpx.AsyncClient(
        base_url=config.imds_endpoint.rstrip("/"),
        transport=transport,
        trust_env=False,
        follow_redirects=False,
        timeout=config.imds_timeout,
    ) as client:
        for attempt in range(1, config.imds_attempts + 1):
            try:
                token = await _request(
                    client, "PUT", TOKEN_PATH,
                    {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)},
                    config.imds_timeout, MAX_TOKEN, _TOKEN,
                )  # fmt: skip
                headers = {"X-aws-ec2-metadata-token": token}
                az = await _request(
                    client, "GET", AZ_PATH, headers, config.imds_timeout, MAX_ANSWER, _LABEL
                )
                region = await _request(
                    client, "GET", REGION_PATH, headers, config.imds_timeout, MAX_ANSWER, _LABEL
                )
                return Placement(az=az, region=region)
            except ImdsError as exc:
                last = str(exc)
                log.debug("IMDS attempt failed", attempt=attempt, error=last)
    raise ImdsError(f"{config.imds_endpoint}: {last} ({config.imds_attempts} attempts)")


async def _request(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    headers: dict[str, str],
    deadline: float,
    limit: int,
    pattern: re.Pattern[str],
) -> str:
    """One IMDS request: its answer, stripped, if it is 200, small and well-formed."""
    import httpx

    what = f"{method} {path}"
    try:
        with trio.fail_after(deadline):
            async with client.stream(method, path, headers=headers) as response:
                if response.status_code != 200:
                    raise ImdsError(f"{what}: HTTP {response.status_code}")
                # IMDS always sends Content-Length; judging the size before
                # reading means a huge or endless answer is never read at all.
                length = response.headers.get("content-length", "")
                if not length.isdigit():
                    raise ImdsError(f"{what}: answer without Content-Length, refused")
                if int(length) > limit:
                    raise ImdsError(f"{what}: answer larger than {limit} bytes, refused")
                if response.headers.get("content-encoding", "identity") != "identity":
                    raise ImdsError(f"{what}: compressed answer, refused")
                body = await response.aread()  # h11 stops at Content-Length
    except trio.TooSlowError:
        raise ImdsError(f"{what}: no answer within {deadline:g} s") from None
    except httpx.HTTPError as exc:
        raise ImdsError(f"{what}: {type(exc).__name__}: {exc}".rstrip(": ")) from exc
    try:
        text = body.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ImdsError(f"{what}: answer is not ASCII, refused") from None
    if not pattern.fullmatch(text):
        raise ImdsError(f"{what}: malformed answer {text[:64]!r}, refused")
    return text


async def resolve_placement(
    config: AgentConfig, *, transport: httpx.AsyncBaseTransport | None = None
) -> AgentConfig:
    """``config`` with ``az``/``region`` ``"auto"`` replaced by what IMDS says.

    A config without ``"auto"`` is returned unchanged, with no request made.
    If IMDS fails the auto values become ``""`` (no AZ or region) and a
    warning is logged, unless ``ec2.imds_required``.

    Raises:
        ImdsError: IMDS failed and ``ec2.imds_required`` is true.
    """
    want_az, want_region = config.az == AUTO, config.region == AUTO
    if not (want_az or want_region):
        return config
    try:
        placement = await fetch_placement(config.ec2, transport=transport)
    except ImdsError as exc:
        if config.ec2.imds_required:
            raise ImdsError(f'az/region "auto": {exc}') from None
        log.warning(
            'EC2 placement unknown: az/region "auto" fall back to none; this node gets no '
            "same-AZ preference (set az and region in agent.toml, or fix IMDS access)",
            error=str(exc),
        )
        placement = Placement(az="", region="")
    else:
        log.info("EC2 placement from IMDS", az=placement.az, region=placement.region)
    return dataclasses.replace(
        config,
        az=placement.az if want_az else config.az,
        region=placement.region if want_region else config.region,
    )
