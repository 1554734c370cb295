"""Downloads, as the book's d2l.download, written whole and checked by SHA-1; zips extracted."""
import hashlib
import http.client
import os
import sys
import urllib.request
import zipfile

from beyond import UserError
from beyond.files import inside, made_folder, what_to_do, whole


def sha1_of(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha1=None):
    """Fetch url into path, once; a file with the wrong SHA-1 is removed, or moved to PATH.bad."""
    placed = os.path.exists(path)
    if not placed:
        try:
            with (made_folder(os.path.dirname(path) or "."), whole(path) as part,
                  urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f):
                expected = int(r.headers.get("Content-Length", -1))
                copy_with_progress(r, f, os.path.basename(path), expected)
                if expected >= 0 and f.tell() != expected:
                    raise OSError(f"the connection closed after {f.tell()} of {expected} bytes")
        except ValueError as e:  # urllib's "unknown url type"
            raise UserError(f"url={url} is not a URL ({e}); give an http(s) URL, or put the file "
                            f"at {path}") from None
        except (OSError, http.client.HTTPException) as e:
            raise UserError(f"cannot download {url} ({e}); fetch it on a machine with network "
                            f"and put it at {path}") from None
    if sha1 and sha1_of(path) != sha1:
        if placed:
            os.replace(path, path + ".bad")
        else:
            os.remove(path)
        done = f"moved to {path}.bad" if placed else "removed"
        raise UserError(f"{path} has the wrong SHA-1 (expected {sha1}), so it was {done}; "
                        "run again to download it afresh")
    return path


def copy_with_progress(source, target, name, total):
    """shutil.copyfileobj, with a progress line on a terminal."""
    show = sys.stderr.isatty()
    of = f" of {total / 1e6:.1f}" if total > 0 else ""
    while chunk := source.read(1 << 20):
        target.write(chunk)
        if show:
            print(f"\r  {name}: {target.tell() / 1e6:.1f}{of} MB", end="", file=sys.stderr,
                  flush=True)
    if show:
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def extract(zip_path, folder):
    """Unzip the folder zip_path holds (hotdog.zip: hotdog/) into folder, whole."""
    name = os.path.basename(folder)
    try:
        with whole(folder) as part, zipfile.ZipFile(zip_path) as z:
            for info in z.infolist():
                if not inside(os.path.join(part, info.filename), part):
                    raise UserError(f"{zip_path} holds a path outside the data root "
                                    f"({info.filename}); delete it and download it again")
                top, _, info.filename = info.filename.partition("/")
                if top == name and info.filename:
                    z.extract(info, part)
            if not os.path.isdir(part):  # nothing extracted: the first extraction makes it
                raise UserError(f"{zip_path} holds nothing in a folder {name}/; delete it, and "
                                "download it again or put the right zip there")
    except (zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{zip_path} is not a whole zip file ({e}); delete it and download it "
                        "again") from None
    except OSError as e:
        raise UserError(f"cannot extract {zip_path} into {folder} ({e.strerror or e}); "
                        f"{what_to_do(e)}") from None
    return folder
