"""Screenshot what a user sees of a study in the MLflow UI: the page the printed ``curves:`` link opens.

Run by hand (it makes ``docs/mlflow-ui-runs.png``), not in CI. It needs Debian's ``chromium`` and
``chromium-driver`` and ``pip install selenium`` (neither is a dependency of this project)::

    python docs/screenshot_mlflow_ui.py 'URL' docs/mlflow-ui-runs.png --charts loss

URL is the address on the sweep's ``curves:`` line, with the host of the server that serves the
study's store. The script does what a user does, in a fresh browser profile (nothing remembered from
an earlier visit): open the link, close the assistant panel, and type ``--charts`` into "Search metric
charts". The link itself lists the completed trials, best first, in the chart view.
"""

from __future__ import annotations

import argparse
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CLOSE_ASSISTANT = "button[data-component-id='mlflow.assistant.chat_panel.close']"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the curves: link, e.g. http://127.0.0.1:5000/#/experiments/1/runs?...")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--charts", default="", help="text for 'Search metric charts' (e.g. loss)")
    p.add_argument("--size", default="1700,1150", help="window size, W,H")
    args = p.parse_args()

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--window-size={args.size}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        driver.get(args.url)
        time.sleep(8)  # the single-page app loads and fetches the runs
        for button in driver.find_elements(By.CSS_SELECTOR, CLOSE_ASSISTANT):  # not on every version
            button.click()
            time.sleep(1)
        if args.charts:
            search = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
            search.send_keys(args.charts)
            time.sleep(3)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
