"""KV page bookkeeping on the host: allocation, reference counts and the automatic prefix cache.

A full page is keyed by its tokens and the key of the page before it, so a key names the whole prefix up to
the page's end. Pages in use carry a reference count; a cached page whose count drops to zero stays cached but
evictable, and is reused least-recently-freed first once the free list is empty. Page 0 is never handed out
(padded page-table entries point at it).
"""

from __future__ import annotations

import collections


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.caching = enable_prefix_caching
        self.free: collections.deque[int] = collections.deque(range(1, num_pages))
        self.refs = [0] * num_pages
        self.key_of: dict[int, object] = {}  # page -> its prefix key, for cached pages
        self.cached: dict[object, int] = {}  # prefix key -> page
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unreferenced
        self.hits = self.queries = 0  # prompt tokens found in / looked up in the cache

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    def usage(self) -> float:
        """Fraction of pages referenced by some sequence (cached, unreferenced pages count as free)."""
        return 1.0 - self.num_available() / self.usable_pages

    def allocate(self) -> int | None:
        if self.free:
            page = self.free.popleft()
        elif self.evictable:
            page, _ = self.evictable.popitem(last=False)
            del self.cached[self.key_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        return page

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page; the tail first, so a prefix's last pages are evicted first."""
        for page in reversed(pages):
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.evictable[page] = None
                else:
                    self.free.append(page)

    @staticmethod
    def page_key(parent, tokens) -> object:
        return (hash(parent), tuple(tokens))

    def match(self, tokens: list[int], limit: int) -> tuple[list[int], list[object]]:
        """Cached pages holding the longest prefix of `tokens` of at most `limit` tokens; each is referenced."""
        if not self.caching:
            return [], []
        pages, keys, parent = [], [], None
        ps = self.page_size
        for i in range(limit // ps):
            key = self.page_key(parent, tokens[i * ps:(i + 1) * ps])
            page = self.cached.get(key)
            if page is None:
                break
            if self.refs[page] == 0:
                del self.evictable[page]
            self.refs[page] += 1
            pages.append(page)
            keys.append(key)
            parent = key
        self.queries += limit
        self.hits += len(pages) * ps
        return pages, keys

    def register(self, page: int, key) -> None:
        """Make a page that has just filled findable by its prefix key (first writer wins)."""
        if self.caching and key not in self.cached and page not in self.key_of:
            self.cached[key] = page
            self.key_of[page] = key

    def hit_ratio(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
