"""AWS region names, as the config validates them (`upstream.aws_region`) and `proxy.aws` reads
them (which configured region names are AWS regions). Here so the config imports nothing of
`proxy`."""

from __future__ import annotations

import re

AWS_REGION_PATTERN = r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$"
_AWS_REGION = re.compile(AWS_REGION_PATTERN)


def looks_like_aws_region(name: str) -> bool:
    """Whether a configured region name is an AWS region (``us-east-1``), not a local label."""
    return _AWS_REGION.fullmatch(name) is not None
