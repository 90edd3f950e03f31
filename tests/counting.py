"""A local file read as an object store serves it, counting the bytes sent: for tests of how much a reader fetches."""

import io


class Counting(io.RawIOBase):
    """A local file as an object store would serve it, adding the bytes it sends to ``sent``."""

    def __init__(self, path, sent: list):
        self.f, self.sent = open(path, "rb"), sent

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def readinto(self, b):
        n = self.f.readinto(b)
        self.sent.append(n)
        return n

    def close(self):
        self.f.close()
        super().close()
