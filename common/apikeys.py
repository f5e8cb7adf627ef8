"""API keys kept in Redis, and the `axion keys create|list|revoke` command that manages them.

Only a SHA-256 of each key is stored (the hash field of `keys.API_KEYS`), with a record of its limits: someone
who reads Redis cannot call the API with what they read. A plain SHA-256 is enough because the keys are 256
random bits, not passwords: there is nothing to guess, so a slow hash would only slow every request.

The key's id is the first 16 hex digits of that hash: it names the key in `list`, `revoke`, logs and rate-limit
buckets, and says nothing about the key itself. Free of litestar and torch (the CLI imports it).
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
import time

import msgspec
import redis
from redis.cluster import RedisCluster

from common import keys, ops
from common.settings import load_or_exit, split_list

KEY_PREFIX = "axn-"


class KeyRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What Redis holds for one key. `models` None means every model; `rpm`/`tpm` None means the defaults
    (RATE_LIMIT_RPM / RATE_LIMIT_TPM), 0 means unlimited."""

    id: str
    name: str = ""
    created: float = 0.0
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None


_decoder = msgspec.json.Decoder(KeyRecord)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    return key_hash(key)[:16]


def decode_record(raw: bytes | str) -> KeyRecord:
    return _decoder.decode(raw)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create(r: redis.Redis | RedisCluster, *, name: str = "", models: list[str] | None = None, rpm: int | None = None,
           tpm: int | None = None) -> tuple[str, KeyRecord]:
    """Store a new key; return it (the only time it is seen) and its record."""
    key = new_key()
    record = KeyRecord(id=key_id(key), name=name, created=time.time(), models=models, rpm=rpm, tpm=tpm)
    r.hset(keys.API_KEYS, key_hash(key), msgspec.json.encode(record))
    return key, record


def records(r: redis.Redis | RedisCluster) -> list[KeyRecord]:
    found = []
    for raw in r.hvals(keys.API_KEYS):
        try:
            found.append(decode_record(raw))
        except msgspec.DecodeError:
            continue
    return sorted(found, key=lambda rec: rec.created)


def revoke(r: redis.Redis | RedisCluster, ident: str) -> int:
    """Delete the keys whose id or name is `ident`; return how many went."""
    gone = 0
    for field, raw in r.hgetall(keys.API_KEYS).items():
        try:
            record = decode_record(raw)
        except msgspec.DecodeError:
            continue
        if ident in (record.id, record.name):
            gone += r.hdel(keys.API_KEYS, field)
    return gone


def main(argv: list[str]) -> int:
    """`axion keys create [--name N] [--models a,b] [--rpm N] [--tpm N] | list | revoke ID_OR_NAME`."""
    reads = ("settings it reads: REDIS_URL (unset: the Redis of the `axion serve` running on this machine), "
             "REDIS_CLUSTER, RATE_LIMIT_RPM, RATE_LIMIT_TPM")
    parser = argparse.ArgumentParser(prog="axion keys", description="Manage the API keys stored in Redis.",
                                     epilog=reads)
    sub = parser.add_subparsers(dest="action", required=True)
    make = sub.add_parser("create", help="create a key and print it (it is shown only once)", epilog=reads)
    make.add_argument("--name", default="", help="a label for list and revoke")
    make.add_argument("--models", default="", help="comma-separated model ids this key may use (default: all)")
    make.add_argument("--rpm", type=int, default=None, help="requests per minute (default RATE_LIMIT_RPM; 0: none)")
    make.add_argument("--tpm", type=int, default=None, help="tokens per minute (default RATE_LIMIT_TPM; 0: none)")
    sub.add_parser("list", help="list keys (ids, names, limits; never the keys)")
    drop = sub.add_parser("revoke", help="delete a key by id or name (API replicas notice within seconds)")
    drop.add_argument("ident")
    args = parser.parse_args(argv)
    for limit in ("rpm", "tpm"):
        if getattr(args, limit, None) is not None and getattr(args, limit) < 0:
            parser.error(f"--{limit} must be >= 0")
    settings = load_or_exit()
    r = ops.connect(settings.redis_url, settings.redis_cluster)
    try:
        if args.action == "create":
            key, record = create(r, name=args.name, models=split_list(args.models) or None, rpm=args.rpm,
                                 tpm=args.tpm)
            print(key)
            print(f"id {record.id}: store the key now, it cannot be shown again", file=sys.stderr)
        elif args.action == "list":
            for rec in records(r):
                rpm, tpm = ("default" if v is None else v for v in (rec.rpm, rec.tpm))
                limits = f"rpm={rpm} tpm={tpm}"
                models = ",".join(rec.models) if rec.models else "*"
                created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.created))
                print(f"{rec.id}  {rec.name or '-'}  {created}  models={models}  {limits}")
        else:
            if revoke(r, args.ident) == 0:
                print(f"axion keys: no key with id or name {args.ident!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.ident}")
    finally:
        r.close()
    return 0
