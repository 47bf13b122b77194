"""Getting a category: MVTec's links in turn, a mirror, a resumed transfer, a corrupt archive and
a dropped-in archive, against a local HTTP server on 127.0.0.1 (tests never reach the internet)."""
import email.message
import hashlib
import io
import json
import tarfile
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import main
from datasets import download
from datasets.download import check_categories, ensure_category, source_record
from datasets.synthetic import make_category
from utils.errors import DataError


def archive_of(tmp_path, category="bottle", top="") -> bytes:
    """A tiny MVTec-layout category as .tar.xz bytes (``top``: a folder above it)."""
    folder = make_category(tmp_path / "made", category, n_train=2, n_test_good=1,
                           defects={"dent": 1}, size=16)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        tar.add(folder, arcname=f"{top}{category}")
    return buffer.getvalue()


class Server:
    """Serves ``routes`` (path -> bytes) with HTTP Range support; a path in ``cut`` has its first
    response broken off halfway; every request's (path, Range header) is kept in ``seen``."""

    def __init__(self):
        self.routes, self.cut, self.seen = {}, set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.seen.append((self.path, self.headers.get("Range")))
                data = server.routes.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if self.path in server.cut:
                    server.cut.discard(self.path)
                    body = body[:len(body) // 2]
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch):
    running = Server()
    monkeypatch.delenv(download.MIRROR_VARIABLE, raising=False)
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


def links(monkeypatch, server, *paths):
    monkeypatch.setitem(download.CATEGORY_LINKS, "bottle", [server.url + p for p in paths])


def test_links_are_tried_in_turn_and_the_one_that_served_is_recorded(tmp_path, server,
                                                                     monkeypatch):
    data = archive_of(tmp_path)
    server.routes["/new/bottle.tar.xz"] = data
    links(monkeypatch, server, "/gone/bottle.tar.xz", "/new/bottle.tar.xz")
    root = tmp_path / "data"
    category = ensure_category(root, "bottle")
    assert len(list((category / "train" / "good").iterdir())) == 2
    assert [path for path, _ in server.seen] == ["/gone/bottle.tar.xz", "/new/bottle.tar.xz"]
    record = source_record(category)
    assert record["source"] == server.url + "/new/bottle.tar.xz"
    assert record["md5"] == hashlib.md5(data).hexdigest()
    assert record["published_md5"] == download.PUBLISHED_MD5["bottle"]
    assert record["matches_published_md5"] is False
    assert sorted(p.name for p in root.iterdir()) == ["bottle"], "no partial files left"


def test_a_category_folder_given_as_the_data_root_is_named_before_any_download(
        tmp_path, server, monkeypatch, capsys, resnet18_weights):
    """--data-root mvtec/bottle (the category itself) would download every category into it;
    said before the backbone is loaded (which may be a download too)."""
    import pipeline

    monkeypatch.setattr(pipeline, "build_extractor", lambda *a: pytest.fail("backbone loaded"))
    server.routes["/new/bottle.tar.xz"] = archive_of(tmp_path)
    links(monkeypatch, server, "/new/bottle.tar.xz")
    make_category(tmp_path / "mvtec", "bottle", n_train=2, n_test_good=1, size=32)
    inside = tmp_path / "mvtec" / "bottle"
    weights = ["--backbone", "resnet18", "--weights", str(resnet18_weights)]
    assert main.main([*weights, "--data-root", str(inside), "--categories", "bottle",
                      "--result-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: category 'bottle' not found in --data-root {inside}, which is itself a category "
        f"folder (it has train/good); pass the folder holding the categories, e.g. --data-root "
        f"{tmp_path / 'mvtec'}")
    assert server.seen == [] and not (inside / "bottle").exists()
    assert main.main([*weights, "--data-root", str(inside), "--custom", "--result-dir",
                      str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"which is itself a category folder; pass the folder holding it, --data-root "
        f"{tmp_path / 'mvtec'}")


def test_a_mirror_is_tried_first_from_the_flag_or_the_environment(tmp_path, server,
                                                                  monkeypatch):
    server.routes["/lab/bottle.tar.xz"] = archive_of(tmp_path)
    links(monkeypatch, server, "/gone/bottle.tar.xz")
    ensure_category(tmp_path / "a", "bottle", mirror=server.url + "/lab/")
    monkeypatch.setenv(download.MIRROR_VARIABLE, server.url + "/lab")
    ensure_category(tmp_path / "b", "bottle")
    assert [path for path, _ in server.seen] == ["/lab/bottle.tar.xz"] * 2
    assert source_record(tmp_path / "b" / "bottle")["source"] == server.url + "/lab/bottle.tar.xz"


def test_a_folder_as_the_mirror_is_read_like_a_url(tmp_path, monkeypatch):
    """A lab's copy on a shared drive: no server needed."""
    monkeypatch.delenv(download.MIRROR_VARIABLE, raising=False)
    monkeypatch.setitem(download.CATEGORY_LINKS, "bottle", [])
    shared = tmp_path / "shared drive"
    shared.mkdir()
    (shared / "bottle.tar.xz").write_bytes(archive_of(tmp_path))
    category = ensure_category(tmp_path / "data", "bottle", mirror=str(shared) + "/")
    assert (category / "train" / "good").is_dir()
    assert source_record(category)["source"] == (shared / "bottle.tar.xz").as_uri()
    with pytest.raises(DataError) as raised:
        ensure_category(tmp_path / "other", "bottle", mirror=str(tmp_path / "no such drive"))
    assert f"the mirror's {(tmp_path / 'no such drive' / 'bottle.tar.xz').as_uri()} answered " \
           "no such file: download" in str(raised.value)
    with pytest.raises(DataError, match=r"answered an address it cannot open \(unknown url "
                                        r"type: s3\)"):
        ensure_category(tmp_path / "other", "bottle", mirror="s3://bucket/mvtec")


def test_an_interrupted_transfer_is_resumed_with_a_range_request(tmp_path, server, monkeypatch):
    data = archive_of(tmp_path)
    server.routes["/new/bottle.tar.xz"] = data
    server.cut.add("/new/bottle.tar.xz")
    links(monkeypatch, server, "/new/bottle.tar.xz")
    category = ensure_category(tmp_path / "data", "bottle")
    assert server.seen == [("/new/bottle.tar.xz", None),
                           ("/new/bottle.tar.xz", f"bytes={len(data) // 2}-")]
    assert source_record(category)["md5"] == hashlib.md5(data).hexdigest()


def test_a_corrupt_archive_is_deleted_with_one_clear_error(tmp_path, server, monkeypatch):
    server.routes["/new/bottle.tar.xz"] = archive_of(tmp_path)[:-200]
    links(monkeypatch, server, "/new/bottle.tar.xz")
    with pytest.raises(DataError, match=r"^the archive of 'bottle' from http://127\.0\.0\.1:\d+/"
                                        r"new/bottle\.tar\.xz is corrupt \(.*\); it was deleted, "
                                        r"run again to download it anew$"):
        ensure_category(tmp_path / "data", "bottle")
    assert list((tmp_path / "data").iterdir()) == []


def test_a_web_page_instead_of_the_archive_tries_the_next_link(tmp_path, server, monkeypatch):
    """An expired share link or a proxy's login page answers 200 with HTML."""
    page = b"\n  <!DOCTYPE html><html><body>This link has expired</body></html>"
    server.routes["/expired/bottle.tar.xz"] = page
    server.routes["/new/bottle.tar.xz"] = archive_of(tmp_path)
    links(monkeypatch, server, "/expired/bottle.tar.xz", "/new/bottle.tar.xz")
    category = ensure_category(tmp_path / "data", "bottle")
    assert source_record(category)["source"] == server.url + "/new/bottle.tar.xz"
    links(monkeypatch, server, "/expired/bottle.tar.xz", "/gone/bottle.tar.xz")
    with pytest.raises(DataError) as raised:
        ensure_category(tmp_path / "other", "bottle")
    assert "MVTec's links for bottle failed (a web page (HTML) instead of the archive: an " \
           "expired link or a login page; HTTP 404)" in str(raised.value)
    assert list((tmp_path / "other").iterdir()) == [], "no partial file or its origin left"


def test_the_answer_of_every_dead_link_is_closed(tmp_path, monkeypatch):
    """An HTTP error carries the open response: left to the garbage collector, each dead link
    tried would hold a socket until then."""
    answers = []

    def answer_404(request, timeout):
        answers.append(io.BytesIO(b"not here"))
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", email.message.Message(),
                                     answers[-1])

    monkeypatch.delenv(download.MIRROR_VARIABLE, raising=False)
    monkeypatch.setattr(download.urllib.request, "urlopen", answer_404)
    monkeypatch.setitem(download.CATEGORY_LINKS, "bottle",
                        ["http://old.example/bottle.tar.xz", "http://new.example/bottle.tar.xz"])
    with pytest.raises(DataError, match=r"links for bottle are gone \(HTTP 404\)"):
        ensure_category(tmp_path / "data", "bottle")
    assert len(answers) == 2 and all(answer.closed for answer in answers)


def test_links_that_fail_alike_are_named_once(tmp_path, monkeypatch):
    def offline(request, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.delenv(download.MIRROR_VARIABLE, raising=False)
    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    monkeypatch.setitem(download.CATEGORY_LINKS, "bottle",
                        ["http://old.example/bottle.tar.xz", "http://new.example/bottle.tar.xz"])
    with pytest.raises(DataError) as raised:
        ensure_category(tmp_path / "data", "bottle")
    assert "MVTec's links for bottle failed (no connection (Name or service not known)): " \
           "download bottle.tar.xz" in str(raised.value)


def test_own_categories_without_custom_are_named_before_any_download(tmp_path, monkeypatch):
    """--custom forgotten: the default, all 15 MVTec categories, would be downloaded into a
    folder of one's own; named categories are still fetched, and the hint comes with the error."""
    make_category(tmp_path / "mine", "part_a", n_train=1, n_test_good=1, defects={}, size=16)
    tried = []

    def offline(request, timeout):
        tried.append(request.full_url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.delenv(download.MIRROR_VARIABLE, raising=False)
    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    hint = "; it holds part_a: for your own categories add custom"  # library names, unbraced
    with pytest.raises(DataError) as raised:
        check_categories(tmp_path / "mine", download.MVTEC_CATEGORIES, download=True)
    assert str(raised.value) == (f"data_root {tmp_path / 'mine'} holds none of MVTec AD's "
                                 f"categories{hint}; to download MVTec AD beside them, name the "
                                 "categories with categories")
    assert tried == []
    with pytest.raises(DataError) as raised:
        check_categories(tmp_path / "mine", download.MVTEC_CATEGORIES, download=False)
    assert str(raised.value).endswith("or drop download" + hint)
    check_categories(tmp_path / "mine", ["bottle"], download=True)
    with pytest.raises(DataError, match="could not download MVTec AD 'bottle'"):
        ensure_category(tmp_path / "mine", "bottle")
    assert len(tried) == len(download.CATEGORY_LINKS["bottle"])


def test_checking_a_missing_data_root_before_a_download_leaves_it_missing(tmp_path):
    """The check runs before the backbone is loaded: a run that stopped there (offline without
    --weights) left an empty data root behind, made only to probe it."""
    check_categories(tmp_path / "new" / "mvtec", ["bottle"], download=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("download_on", [True, False])
def test_a_data_root_that_cannot_be_written_is_named_before_a_fetch(tmp_path, monkeypatch,
                                                                  download_on):
    """A category to download, or a dropped-in archive to extract, into a folder that cannot be
    written used to end in the first write's PermissionError traceback."""
    import tempfile

    root = tmp_path / "shared"
    make_category(root, "bottle", n_train=1, n_test_good=1, defects={}, size=16)
    (root / "cable.tar.xz").write_bytes(b"an archive dropped in")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    check_categories(root, ["bottle"], download=download_on)  # present: nothing to write
    with pytest.raises(DataError) as raised:
        check_categories(root, ["bottle", "cable"], download=download_on)
    assert str(raised.value) == (f"cable would be fetched into data_root {root}, which cannot be "
                                 "written (Permission denied); give a data_root you can write "
                                 f"to, or put each category there by hand (from "
                                 f"{download.MVTEC_PAGE})")


def test_without_downloads_every_missing_category_is_named_before_any_work(
        tmp_path, capsys, resnet18_weights, monkeypatch):
    """It used to stop at the first missing one, after the categories before it had run."""
    import pipeline

    root = tmp_path / "data"
    make_category(root, "bottle", n_train=2, n_test_good=1, size=32)
    (root / "screw.tar.xz").write_bytes(b"a drop-in counts as present")
    monkeypatch.setattr(pipeline.Run, "category", lambda *args: pytest.fail("work started"))
    assert main.main(["--backbone", "resnet18", "--weights", str(resnet18_weights),
                      "--data-root", str(root), "--no-download",
                      "--categories", "bottle", "cable", "screw", "zipper",
                      "--result-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: categories not found in --data-root {root}: cable, zipper; put each so that "
        f"{root}/<category>/train/good exists (from {download.MVTEC_PAGE}), or drop --no-download")
    # one category: its own message, also before the backbone is loaded (offline without
    # --weights, that load's failure used to hide what was wrong with the data)
    monkeypatch.setattr(pipeline, "build_extractor", lambda *a: pytest.fail("backbone loaded"))
    for dry_run in ([], ["--dry-run"]):
        assert main.main(["--data-root", str(root), "--no-download", "--categories", "cable",
                          "--result-dir", str(tmp_path / "r"), *dry_run]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: category 'cable' not found in --data-root {root}: put it so that "
            f"{root}/cable/train/good exists (from {download.MVTEC_PAGE}), or drop --no-download")
        assert not (tmp_path / "r").exists()  # a run that stopped before any output left none


def test_a_corrupt_dropped_in_archive_is_one_line(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    (root / "bottle.tar.xz").write_bytes(b"not an archive")
    with pytest.raises(DataError) as raised:
        ensure_category(root, "bottle", download=False)
    assert str(raised.value).count("\n") == 0
    assert str(raised.value).startswith(f"{root / 'bottle.tar.xz'} is corrupt (")


def test_an_incomplete_category_folder_is_named_before_any_fetch(tmp_path, monkeypatch):
    """The archive used to be extracted inside it (bottle/bottle/), and the run then said that
    bottle/train/good held no images."""
    root = tmp_path / "data"
    (root / "bottle" / "test").mkdir(parents=True)
    (root / "bottle.tar.xz").write_bytes(archive_of(tmp_path))
    expected = (f"{root / 'bottle'} exists but holds no readable train/good (an incomplete copy?):"
                " complete it, or move it away so that 'bottle' can be extracted there")
    for check in (lambda: check_categories(root, ["bottle"], download=True),
                  lambda: ensure_category(root, "bottle")):
        with pytest.raises(DataError) as raised:
            check()
        assert str(raised.value) == expected
    assert sorted(p.name for p in (root / "bottle").iterdir()) == ["test"]
    (root / "bottle").rename(tmp_path / "moved")
    assert (ensure_category(root, "bottle") / "train" / "good" / "000.png").is_file()


@pytest.mark.parametrize("name,top", [("bottle.tar.xz", ""),
                                      ("mvtec_anomaly_detection.tar.xz", "")])
def test_a_dropped_in_archive_is_extracted_without_network(name, top, tmp_path, monkeypatch):
    monkeypatch.setitem(download.CATEGORY_LINKS, "bottle", ["http://127.0.0.1:9/unreachable"])
    root = tmp_path / "data"
    root.mkdir()
    data = archive_of(tmp_path, top=top)
    if name == download.WHOLE_ARCHIVE:  # the whole dataset: several categories side by side
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
            tar.add(make_category(tmp_path / "other", "cable", n_train=1, n_test_good=1,
                                  size=16), arcname="cable")
            tar.add(tmp_path / "made" / "bottle", arcname="bottle")
        data = buffer.getvalue()
    (root / name).write_bytes(data)
    category = ensure_category(root, "bottle")
    assert (category / "train" / "good" / "000.png").is_file()
    assert not (root / "cable").exists(), "only the asked category is extracted"
    record = source_record(category)
    assert record["source"] == f"drop-in {root / name}" and record["archive"] == name
    assert record["md5"] == hashlib.md5(data).hexdigest()


def test_cli_with_a_mirror_that_answers_404_is_one_line(tmp_path, server, monkeypatch, capsys,
                                                        resnet18_weights):
    links(monkeypatch, server, "/old/bottle.tar.xz", "/older/bottle.tar.xz")
    root = tmp_path / "data"
    code = main.main(["--categories", "bottle", "--data-root", str(root), "--mirror",
                      server.url + "/lab", "--backbone", "resnet18", "--weights",
                      str(resnet18_weights), "--result-dir", str(tmp_path / "r"),
                      "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: could not download MVTec AD 'bottle': the mirror's {server.url}/lab/bottle.tar.xz"
        " answered HTTP 404, and MVTec's links for bottle are gone (HTTP 404): download "
        f"bottle.tar.xz from {download.MVTEC_PAGE} and put it in {root}, or pass --mirror URL\n")


@pytest.mark.parametrize("flag", [[], ["--no-download"], ["--custom"]])
def test_a_file_as_the_data_root_is_one_line(flag, tmp_path, capsys, resnet18_weights):
    """With downloads on, making the data root was where it ended: in mkdir's traceback."""
    code = main.main(["--categories", "bottle", "--data-root", str(resnet18_weights),
                      "--backbone", "resnet18", "--weights", str(resnet18_weights),
                      "--result-dir", str(tmp_path / "r"), "--no-progress"] + flag)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data-root {resnet18_weights} is a file, not a folder; ")
    assert err.count("\n") == 1


def test_cli_runs_from_a_dropped_in_archive_and_records_its_md5(tmp_path, monkeypatch,
                                                                resnet18_weights):
    monkeypatch.setitem(download.CATEGORY_LINKS, "bottle", ["http://127.0.0.1:9/unreachable"])
    root = tmp_path / "data"
    root.mkdir()
    data = archive_of(tmp_path)
    (root / "bottle.tar.xz").write_bytes(data)
    out = tmp_path / "r"
    assert main.main(["--categories", "bottle", "--data-root", str(root), "--backbone",
                      "resnet18", "--weights", str(resnet18_weights), "--resize", "16", "--crop",
                      "16", "--coreset", "0.5", "--plots", "0", "--no-progress", "--workers", "0",
                      "--result-dir", str(out)]) == 0
    bottle = json.loads((out / "metrics.json").read_text())["categories"]["bottle"]
    assert bottle["data_source"]["md5"] == hashlib.md5(data).hexdigest()
    assert bottle["data_source"]["matches_published_md5"] is False
