"""Screenshot what a user sees of a study in the MLflow UI: its runs page, chart view, trials listed.

Run by hand (it makes ``docs/mlflow-ui-runs.png``), not in CI. It needs Debian's ``chromium`` and
``chromium-driver`` and ``pip install selenium`` (neither is a dependency of this project)::

    python docs/screenshot_mlflow_ui.py http://127.0.0.1:5000 1 docs/mlflow-ui-runs.png --charts loss

It does what a user does: open the experiment's runs page with "Model training" selected (the
``curves:`` link ``sweep.run`` prints), close the assistant panel, expand the study's parent run
so that its ``trial-<n>`` runs are listed, switch to the chart view and type ``--charts`` into
"Search metric charts".
"""

from __future__ import annotations

import argparse
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

EXPAND = "button[data-component-id$='runnamecellrenderer.tsx_46']"  # the parent run's "+" button
CLOSE_ASSISTANT = "button[data-component-id='mlflow.assistant.chat_panel.close']"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("server", help="the MLflow server, e.g. http://127.0.0.1:5000")
    p.add_argument("experiment_id")
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
        server = args.server.rstrip("/")
        page = f"{server}/#/experiments/{args.experiment_id}/runs?workflowType=machine_learning"
        driver.get(page)
        time.sleep(6)  # the single-page app loads and fetches the runs
        driver.find_element(By.CSS_SELECTOR, EXPAND).click()  # the UI keeps this in local storage
        time.sleep(2)
        driver.get(page + "&compareRunsMode=CHART")
        time.sleep(6)
        driver.find_element(By.CSS_SELECTOR, CLOSE_ASSISTANT).click()
        time.sleep(2)
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
