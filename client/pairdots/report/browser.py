"""Render an HTML report in headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium; the `report` extra): for the DOM checks of the report test and for screenshots.

    python3 -m pairdots.report.browser report.html report.png [--width 1100] [--height 0]

Nothing is downloaded: the browser and the driver are the system's (/usr/bin/chromium,
/usr/bin/chromedriver, or $PAIRDOTS_CHROMIUM / $PAIRDOTS_CHROMEDRIVER), never Selenium
Manager's. A height of 0 screenshots the whole page.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["chromium_paths", "headless_chromium", "screenshot"]


def chromium_paths() -> tuple[str, str]:
    """(browser, driver) executables; FileNotFoundError saying what to install."""
    browser = os.environ.get("PAIRDOTS_CHROMIUM") or shutil.which("chromium") or ""
    driver = os.environ.get("PAIRDOTS_CHROMEDRIVER") or shutil.which("chromedriver") or ""
    if not (browser and driver):
        raise FileNotFoundError(
            "headless Chromium needs Debian's chromium and chromium-driver packages "
            "(apt-get install chromium chromium-driver, as .ci/install does) or "
            "PAIRDOTS_CHROMIUM / PAIRDOTS_CHROMEDRIVER"
        )
    return browser, driver


@contextmanager
def headless_chromium(width: int = 1100, height: int = 900) -> Iterator[Any]:
    """A Selenium WebDriver on headless Chromium with a width × height window; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(
    html_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    *,
    width: int = 1100,
    height: int = 0,
) -> Path:
    """Open `html_path` in headless Chromium and save a PNG of its first `height` pixels
    (0: the whole page) at `width` CSS pixels; returns the PNG path."""
    url = Path(html_path).resolve().as_uri()
    with headless_chromium(width, height or 900) as driver:
        driver.get(url)
        if not height:
            full = int(
                driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
            )
            driver.set_window_size(width, full)
            driver.get(url)
        driver.save_screenshot(str(png_path))
    return Path(png_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("html")
    p.add_argument("png")
    p.add_argument("--width", type=int, default=1100)
    p.add_argument("--height", type=int, default=0, help="pixels from the top (0: the page)")
    args = p.parse_args(argv)
    out = screenshot(args.html, args.png, width=args.width, height=args.height)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
