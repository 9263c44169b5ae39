"""The README's pictures of the coverage report: Debian's headless chromium, the network off.

    python scripts/readme_screenshots.py runs/quickstart docs/

Writes ``report.png`` (the presence figure and the coverage table) and ``gallery.png`` (the mask
gallery) from the report of RUN, 1400 pixels wide. Needs ``apt-get install chromium chromium-driver``
and the test extra (Selenium).
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from sam3_engine.dashboards.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp, "report.html")
            write_report(args.run, str(page), gallery_per_concept=2, gallery_concepts=6)
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd(
                "Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
            )
            driver.get(page.as_uri())
            drawn = "return document.querySelectorAll('.js-plotly-plot .main-svg').length"
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(drawn))
            args.out.mkdir(parents=True, exist_ok=True)
            for element_id, name in (("presence", "report.png"), ("gallery", "gallery.png")):
                driver.execute_script("arguments[0].scrollIntoView()", driver.find_element(By.ID, element_id))
                picture = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
                picture.quantize(256).save(args.out / name, optimize=True)  # a palette: a third of the bytes, the same look
                print(args.out / name)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
