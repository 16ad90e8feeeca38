"""The S3 behaviours stagerd depends on, run against every server of the interop matrix
(``--s3-servers=seaweedfs,moto,swift,swift-old`` or ``$STAGERD_TEST_S3_SERVERS``).

What stagerd relies on is asserted everywhere. Where servers legitimately differ (part-count
limit, minimum part size, checksum handling, whether credentials are checked at all) the
test detects the behaviour and records it (``interop_record``: printed in the run summary,
JSON in ``$STAGERD_INTEROP_REPORT``) instead of assuming AWS's.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3Server, make_s3_client

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
Record = Callable[[str, str, object], None]


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def server_version(server: S3Server) -> str:
    """The version of the running server, asked of the server or of what started it."""
    if server.name.startswith("swift"):
        with urllib.request.urlopen(f"{server.endpoint}/info", timeout=5) as resp:
            return f"swift {json.load(resp)['swift']['version']}"
    if server.name == "moto":  # build/services.sh runs moto_server from the test venv
        return f"moto {importlib.metadata.version('moto')}"
    weed = Path(sys.executable).with_name("weed")
    binary = str(weed) if weed.exists() else shutil.which("weed")
    if binary is None:
        return "seaweedfs (version unknown)"
    out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30)
    # "version 8000GB 4.48 pypi linux amd64": the release is the first dotted number.
    release = next((w for w in out.stdout.split() if w[:1].isdigit() and "." in w), "?")
    return f"seaweedfs {release}"


def test_server_version_is_recorded(s3_server: S3Server, interop_record: Record) -> None:
    version = server_version(s3_server)
    if s3_server.version:  # what build/swift.sh installed is what answers
        assert version == f"swift {s3_server.version}"
    assert any(ch.isdigit() for ch in version), version
    interop_record(s3_server.name, "version", version)


def test_multipart_lifecycle_with_md5_part_etags(
    s3_server: S3Server, s3_client: Any, s3_bucket: str, interop_record: Record
) -> None:
    from botocore.exceptions import ClientError

    parts_data = [os.urandom(5 * MiB), os.urandom(123_457)]
    upload = s3_client.create_multipart_upload(
        Bucket=s3_bucket, Key="mp", Metadata={"sha256": "abc"}
    )
    upload_id = upload["UploadId"]
    etags = []
    for number, data in enumerate(parts_data, start=1):
        part = s3_client.upload_part(
            Bucket=s3_bucket, Key="mp", UploadId=upload_id, PartNumber=number, Body=data
        )
        assert part["ETag"].strip('"') == hashlib.md5(data).hexdigest()
        etags.append(part["ETag"])
    uploads = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [("mp", upload_id)]
    listed = s3_client.list_parts(Bucket=s3_bucket, Key="mp", UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in listed] == [
        (1, etags[0], len(parts_data[0])),
        (2, etags[1], len(parts_data[1])),
    ]
    done = s3_client.complete_multipart_upload(
        Bucket=s3_bucket,
        Key="mp",
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )
    whole = b"".join(parts_data)
    body = s3_client.get_object(Bucket=s3_bucket, Key="mp")
    assert body["Body"].read() == whole
    assert body["Metadata"] == {"sha256": "abc"}
    md5s = b"".join(hashlib.md5(d).digest() for d in parts_data)
    aws_style = f'"{hashlib.md5(md5s).hexdigest()}-{len(parts_data)}"'
    interop_record(s3_server.name, "multipart etag md5-of-md5s-N", done["ETag"] == aws_style)
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")

    aborted = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="gone")["UploadId"]
    s3_client.upload_part(
        Bucket=s3_bucket, Key="gone", UploadId=aborted, PartNumber=1, Body=b"x" * 1000
    )
    s3_client.abort_multipart_upload(Bucket=s3_bucket, Key="gone", UploadId=aborted)
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    with pytest.raises(ClientError) as err:
        s3_client.list_parts(Bucket=s3_bucket, Key="gone", UploadId=aborted)
    assert _code(err.value) == "NoSuchUpload"


def test_part_limits_are_detected(
    s3_server: S3Server, s3_client: Any, s3_bucket: str, interop_record: Record
) -> None:
    from botocore.exceptions import ClientError

    upload_id = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="probe")["UploadId"]
    accepted = []
    for number in (1000, 1001, 10000, 10001):
        try:
            s3_client.upload_part(
                Bucket=s3_bucket, Key="probe", UploadId=upload_id, PartNumber=number, Body=b"p"
            )
            accepted.append(number)
        except ClientError as exc:
            assert _status(exc) == 400, exc.response
            # SeaweedFS answers InvalidPart; AWS and Swift InvalidArgument.
            assert _code(exc) in {"InvalidArgument", "InvalidPartNumber", "InvalidPart"}, (
                exc.response
            )
    s3_client.abort_multipart_upload(Bucket=s3_bucket, Key="probe", UploadId=upload_id)
    # stagerd's uploads stay within 1000 parts, which every server must take.
    assert 1000 in accepted
    interop_record(s3_server.name, "max part number", max(accepted))

    upload_id = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="small")["UploadId"]
    etags = [
        s3_client.upload_part(
            Bucket=s3_bucket, Key="small", UploadId=upload_id, PartNumber=n, Body=body
        )["ETag"]
        for n, body in ((1, os.urandom(MiB)), (2, b"tail"))
    ]
    parts = {"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]}
    try:
        s3_client.complete_multipart_upload(
            Bucket=s3_bucket, Key="small", UploadId=upload_id, MultipartUpload=parts
        )
        enforced = False
    except ClientError as exc:
        assert _code(exc) == "EntityTooSmall", exc.response
        enforced = True
        s3_client.abort_multipart_upload(Bucket=s3_bucket, Key="small", UploadId=upload_id)
    interop_record(s3_server.name, "min part size enforced", enforced)


def test_ranged_get_and_head_with_if_match(
    s3_client: Any, s3_bucket: str, s3_server: S3Server, interop_record: Record
) -> None:
    from botocore.exceptions import ClientError

    data = os.urandom(MiB + 3)
    etag = s3_client.put_object(Bucket=s3_bucket, Key="r", Body=data)["ETag"]
    assert etag.strip('"') == hashlib.md5(data).hexdigest()
    got = s3_client.get_object(Bucket=s3_bucket, Key="r", Range="bytes=1000-2999", IfMatch=etag)
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes 1000-2999/{len(data)}"
    assert got["Body"].read() == data[1000:3000]
    tail = s3_client.get_object(Bucket=s3_bucket, Key="r", Range=f"bytes={MiB}-")
    assert tail["Body"].read() == data[MiB:]
    wrong = '"' + "0" * 32 + '"'
    with pytest.raises(ClientError) as err:
        s3_client.get_object(Bucket=s3_bucket, Key="r", Range="bytes=0-9", IfMatch=wrong)
    assert _status(err.value) == 412
    assert _code(err.value) == "PreconditionFailed"
    head = s3_client.head_object(Bucket=s3_bucket, Key="r", IfMatch=etag)
    assert head["ContentLength"] == len(data)
    assert head["ETag"] == etag
    with pytest.raises(ClientError) as err:
        s3_client.head_object(Bucket=s3_bucket, Key="r", IfMatch=wrong)
    assert _status(err.value) == 412
    interop_record(s3_server.name, "ranged GET + If-Match 412", "yes")


def test_user_metadata_round_trip(s3_client: Any, s3_bucket: str) -> None:
    digest = hashlib.sha256(b"payload").hexdigest()
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=b"payload", Metadata={"sha256": digest})
    assert s3_client.head_object(Bucket=s3_bucket, Key="m")["Metadata"] == {"sha256": digest}
    got = s3_client.get_object(Bucket=s3_bucket, Key="m")
    assert got["Metadata"] == {"sha256": digest}
    assert got["Body"].read() == b"payload"


def _client_with(server: S3Server, checksum: str, *, tls: bool = False) -> Any:
    return make_s3_client(
        server,
        endpoint=server.tls_endpoint if tls else None,
        verify=server.ca_bundle if tls else None,
        checksum=checksum,
        retries={"mode": "standard", "total_max_attempts": 1},
    )


def _outcome(fn: Callable[[], Any]) -> str:
    from botocore.exceptions import ClientError

    try:
        fn()
    except ClientError as exc:
        return f"rejected ({_code(exc)}, HTTP {_status(exc)})"
    return "accepted"


def test_checksum_modes(s3_server: S3Server, s3_bucket: str, interop_record: Record) -> None:
    required = _client_with(s3_server, "when_required")  # what stagerd's factory uses
    required.put_object(Bucket=s3_bucket, Key="req", Body=b"r" * 1000)
    assert required.get_object(Bucket=s3_bucket, Key="req")["Body"].read() == b"r" * 1000
    upload_id = required.create_multipart_upload(Bucket=s3_bucket, Key="mp")["UploadId"]
    part = required.upload_part(
        Bucket=s3_bucket, Key="mp", UploadId=upload_id, PartNumber=1, Body=b"p" * 1000
    )
    required.complete_multipart_upload(
        Bucket=s3_bucket,
        Key="mp",
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert required.get_object(Bucket=s3_bucket, Key="mp")["Body"].read() == b"p" * 1000

    supported = _client_with(s3_server, "when_supported")  # boto3's default since 1.36
    put = _outcome(lambda: supported.put_object(Bucket=s3_bucket, Key="sup", Body=b"s" * 1000))
    interop_record(s3_server.name, "put with when_supported (http)", put)

    def multipart_supported() -> None:
        uid = supported.create_multipart_upload(Bucket=s3_bucket, Key="supmp")["UploadId"]
        etag = supported.upload_part(
            Bucket=s3_bucket, Key="supmp", UploadId=uid, PartNumber=1, Body=b"q" * 1000
        )["ETag"]
        supported.complete_multipart_upload(
            Bucket=s3_bucket,
            Key="supmp",
            UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
        )

    interop_record(s3_server.name, "multipart with when_supported", _outcome(multipart_supported))
    wrong_crc = base64.b64encode(b"\0\0\0\0").decode()
    interop_record(
        s3_server.name,
        "wrong x-amz-checksum-crc32",
        _outcome(
            lambda: required.put_object(
                Bucket=s3_bucket, Key="crc", Body=b"c" * 1000, ChecksumCRC32=wrong_crc
            )
        ),
    )
    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    bad_md5 = _outcome(
        lambda: required.put_object(
            Bucket=s3_bucket, Key="md5", Body=b"m" * 1000, ContentMD5=wrong_md5
        )
    )
    interop_record(s3_server.name, "wrong Content-MD5", bad_md5)


def test_checksum_modes_over_tls(
    s3_server: S3Server, s3_bucket: str, interop_record: Record
) -> None:
    """Over HTTPS boto3 sends streaming uploads aws-chunked with a trailing CRC32 unless
    checksums are only computed when required: the mode production must use on old Swift."""
    import io

    if not s3_server.tls_endpoint:
        interop_record(s3_server.name, "https endpoint", "none (not tested over TLS)")
        return
    required = _client_with(s3_server, "when_required", tls=True)
    data = os.urandom(300_000)
    required.upload_fileobj(io.BytesIO(data), s3_bucket, "tls-req")
    assert required.get_object(Bucket=s3_bucket, Key="tls-req")["Body"].read() == data
    supported = _client_with(s3_server, "when_supported", tls=True)
    outcome = _outcome(
        lambda: supported.put_object(Bucket=s3_bucket, Key="tls-sup", Body=io.BytesIO(data))
    )
    if outcome == "accepted":  # accepted must mean stored intact, not stored with the framing
        stored = required.get_object(Bucket=s3_bucket, Key="tls-sup")["Body"].read()
        outcome = "accepted" if stored == data else "accepted but stored corrupted"
    interop_record(s3_server.name, "put with when_supported (https)", outcome)


def test_missing_bucket_is_no_such_bucket(s3_client: Any, unique: str) -> None:
    from botocore.exceptions import ClientError

    missing = f"missing-{unique}"
    with pytest.raises(ClientError) as err:
        s3_client.get_object(Bucket=missing, Key="k")
    assert _code(err.value) == "NoSuchBucket"
    assert _status(err.value) == 404
    with pytest.raises(ClientError) as err:
        s3_client.head_bucket(Bucket=missing)
    assert _status(err.value) == 404


# moto's server accepts any credentials unless told otherwise; that is recorded, not hidden.
CREDENTIALS_UNCHECKED = {"moto"}


def test_wrong_credentials_are_403(
    s3_server: S3Server, s3_bucket: str, interop_record: Record
) -> None:
    from botocore.exceptions import ClientError

    wrong = S3Server(s3_server.name, s3_server.endpoint, s3_server.access_key, "not-the-secret")
    unknown = S3Server(s3_server.name, s3_server.endpoint, "nobody-here", "not-the-secret")
    for server in (wrong, unknown):
        client = make_s3_client(server)
        if s3_server.name in CREDENTIALS_UNCHECKED:
            client.head_bucket(Bucket=s3_bucket)
            continue
        with pytest.raises(ClientError) as err:
            client.get_object(Bucket=s3_bucket, Key="k")
        assert _status(err.value) == 403, err.value.response
        assert _code(err.value) in {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}
    checked = s3_server.name not in CREDENTIALS_UNCHECKED
    interop_record(s3_server.name, "wrong credentials -> 403", "yes" if checked else "not checked")
