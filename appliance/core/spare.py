from .addr import cidr

SPARE = (cidr("0.0.0.0/0"), cidr("::/0"))
