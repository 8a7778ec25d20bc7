"""A read-only pyarrow file system over HTTP(S), for HATS catalogs at ``https://`` URLs.

pyarrow has no HTTP file system and fsspec's needs ``aiohttp`` (not a dependency);
this handler is on ``requests``, with the same urllib3 ``Retry`` policy as the
catalog service client.
"""

from __future__ import annotations

from pyarrow.fs import FileSystemHandler

__all__ = ["HTTPHandler"]

_RETRY_STATUS = (500, 502, 503, 504)


class HTTPHandler(FileSystemHandler):
    """A read-only pyarrow file system handler over HTTP(S), on ``requests``.

    Paths are ``host[:port]/path``; a file is what answers ``HEAD`` with 200, a
    folder what answers for ``path/``.  Bodies are read whole with ``GET``
    (HATS partitions are read whole anyway); the last body is kept until the next
    file is opened, so reading a partition's schema and then its columns fetches it
    once.  Both go through a session whose
    urllib3 ``Retry`` retries connection faults, timeouts and 5xx answers with
    exponential backoff.  Folders cannot be listed: a HATS catalog over HTTP
    needs its ``partition_info.csv`` (or ``dataset/_metadata``).

    Use it as ``pyarrow.fs.PyFileSystem(HTTPHandler("https", ...))``.
    """

    def __init__(self, scheme: str, timeout: float, retries: int, backoff: float):
        self.scheme = scheme
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._session = None
        self._last: tuple[str, bytes] | None = None

    def close(self) -> None:
        """Close the HTTP session (its pooled connections) and drop the kept body."""
        self._last = None
        if self._session is not None:
            self._session.close()
            self._session = None

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def __hash__(self):
        return id(self)

    def get_type_name(self) -> str:
        return "roman_tweakreg-http"

    def normalize_path(self, path: str) -> str:
        return path

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{path.lstrip('/')}"

    def _request(self, method: str, path: str):
        import requests

        if self._session is None:
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            retry = Retry(
                total=self.retries,
                connect=self.retries,
                read=self.retries,
                status=self.retries,
                other=self.retries,
                redirect=5,
                backoff_factor=self.backoff,
                backoff_max=max(self.backoff, 10.0),
                status_forcelist=_RETRY_STATUS,
                allowed_methods=frozenset({"GET", "HEAD"}),
                raise_on_status=False,
                respect_retry_after_header=False,
            )
            self._session = requests.Session()
            adapter = HTTPAdapter(max_retries=retry)
            self._session.mount("http://", adapter)
            self._session.mount("https://", adapter)
            self._session.headers["User-Agent"] = "roman_tweakreg"
        url = self._url(path)
        try:
            return self._session.request(
                method, url, timeout=self.timeout, allow_redirects=True
            )
        except requests.Timeout as err:
            raise OSError(f"{url}: timed out ({err})") from err
        except requests.RequestException as err:
            reason = err.args[0] if err.args else err
            reason = getattr(reason, "reason", reason)
            raise OSError(f"{url}: {type(reason).__name__}: {reason}") from err

    def _file_info(self, path: str):
        from pyarrow import fs

        response = self._request("HEAD", path)
        if response.status_code == 200:
            kind = fs.FileType.Directory if response.url.endswith("/") else fs.FileType.File
            size = response.headers.get("Content-Length")
            if kind == fs.FileType.File and size and size.isdigit():
                return fs.FileInfo(path, kind, size=int(size))
            return fs.FileInfo(path, kind)
        if response.status_code in (403, 404, 410) and not path.endswith("/"):
            folder = self._request("HEAD", path + "/")
            if folder.status_code == 200:
                return fs.FileInfo(path, fs.FileType.Directory)
            return fs.FileInfo(path, fs.FileType.NotFound)
        raise OSError(f"{self._url(path)}: HTTP {response.status_code} {response.reason}")

    def get_file_info(self, paths):
        return [self._file_info(p) for p in paths]

    def get_file_info_selector(self, selector):
        if selector.allow_not_found:
            return []
        raise FileNotFoundError(
            f"{self._url(selector.base_dir)}: folders cannot be listed over HTTP "
            "(a HATS catalog there needs its partition_info.csv)"
        )

    def open_input_file(self, path: str):
        import pyarrow as pa

        if self._last is not None and self._last[0] == path:
            return pa.BufferReader(self._last[1])
        self._last = None
        response = self._request("GET", path)
        if response.status_code == 404:
            raise FileNotFoundError(f"{self._url(path)}: HTTP 404")
        if response.status_code != 200:
            raise OSError(f"{self._url(path)}: HTTP {response.status_code} {response.reason}")
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) != len(response.content):
            raise OSError(
                f"{self._url(path)}: the answer was cut short in transfer "
                f"({len(response.content)} of {length} bytes)"
            )
        self._last = (path, response.content)
        return pa.BufferReader(response.content)

    def open_input_stream(self, path: str):
        return self.open_input_file(path)

    def _read_only(self, *args, **kwargs):
        raise OSError("the HTTP catalog file system is read-only")

    create_dir = _read_only
    delete_dir = _read_only
    delete_dir_contents = _read_only
    delete_root_dir_contents = _read_only
    delete_file = _read_only
    move = _read_only
    copy_file = _read_only
    open_output_stream = _read_only
    open_append_stream = _read_only

