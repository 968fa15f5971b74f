"""Drives the dashboard in headless Chromium (Debian's chromium and chromium-driver, through the
pinned Selenium client) after the Rust test has played a scenario on the gateway.

Usage: dashboard_browser.py BASE_URL RUN_ID EXCHANGE_ID KNOWN_TEXT SCREENSHOT_DIR

Checks, page by page: the page draws with no error box and no console error, every chart has
data points, the traffic search finds the known request, a prompt holding a <script> tag is shown
as text and never runs, and the Rollouts page's roll-back button rolls the canary back (checked
through the API). Screenshots of every page go to SCREENSHOT_DIR. Prints one line per check.
"""

import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, run_id, exchange_id, known_text, shots = sys.argv[1:6]
os.makedirs(shots, exist_ok=True)

options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1400,1000"]:
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
driver.set_page_load_timeout(30)


def api(path):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read())


def console_errors():
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def settled(d):
    """The page has drawn: no 'Loading…' left and the charts it drew are in place."""
    main = d.find_element(By.ID, "app")
    if "Loading…" in main.text:
        return False
    return all(c.get_attribute("data-points") is not None for c in d.find_elements(By.CSS_SELECTOR, ".chart"))


def visit(path, name, charts_expected=True):
    driver.get(base + path)
    WebDriverWait(driver, 20).until(settled)
    time.sleep(0.5)  # uPlot draws on the next animation frame
    errors = driver.find_elements(By.CSS_SELECTOR, "#app .error")
    assert not errors, f"{path}: {[e.text for e in errors]}"
    logged = console_errors()
    assert not logged, f"{path}: console errors {logged}"
    charts = driver.find_elements(By.CSS_SELECTOR, ".chart")
    if charts_expected:
        assert charts, f"{path}: no chart"
    for c in charts:
        points = int(c.get_attribute("data-points"))
        assert points > 0, f"{path}: chart '{c.get_attribute('data-chart')}' has no data points"
        assert c.find_elements(By.CSS_SELECTOR, "canvas"), f"{path}: chart '{c.get_attribute('data-chart')}' drew nothing"
    driver.save_screenshot(os.path.join(shots, f"{name}.png"))
    print(f"ok {path}: {len(charts)} charts with data")


try:
    visit("/ui/overview", "overview")
    assert driver.find_elements(By.CSS_SELECTOR, 'section[data-route="agent"]'), "the agent route is shown"
    assert driver.find_elements(By.CSS_SELECTOR, 'section[data-route="plain"]'), "the plain route is shown"
    visit("/ui/overview?window=1d", "overview-1d")
    visit("/ui/runs", "runs", charts_expected=False)
    visit(f"/ui/runs/{run_id}", "run")
    visit("/ui/rollouts", "rollouts")
    visit("/ui/adapters", "adapters", charts_expected=False)
    visit("/ui/rails", "rails")
    categories = driver.find_elements(By.CSS_SELECTOR, 'section[data-route="plain"] table tbody tr')
    assert categories, "the Rails page shows no blocked category or rail latency for the guarded route"
    print(f"ok rails: {len(categories)} rows of categories and rail latencies")
    visit("/ui/jobs", "jobs", charts_expected=False)
    visit(f"/ui/traffic/{exchange_id}", "exchange", charts_expected=False)

    # The traffic search finds the known request, from the form.
    visit("/ui/traffic", "traffic", charts_expected=False)
    box = driver.find_element(By.CSS_SELECTOR, 'form.filters input[name="q"]')
    box.send_keys(known_text)
    driver.find_element(By.CSS_SELECTOR, 'form.filters button[type="submit"]').click()
    WebDriverWait(driver, 20).until(lambda d: "q=" in d.current_url and d.find_elements(By.CSS_SELECTOR, "#app table, #app p.muted"))
    prompts = [p.text for p in driver.find_elements(By.CSS_SELECTOR, "span.prompt")]
    assert prompts == [known_text], f"search for {known_text!r} showed {prompts}"
    print(f"ok search: {known_text!r} found")

    # A prompt with a script tag is text on the page, and nothing ran.
    driver.get(base + "/ui/traffic?q=pwned")
    WebDriverWait(driver, 20).until(settled)
    prompts = [p.text for p in driver.find_elements(By.CSS_SELECTOR, "span.prompt")]
    assert any("<script>" in p for p in prompts), f"the script prompt is not shown as text: {prompts}"
    assert driver.execute_script("return window.__pwned === undefined"), "the prompt's script ran"
    assert not driver.find_elements(By.CSS_SELECTOR, "#app script"), "a script element reached the page"
    driver.save_screenshot(os.path.join(shots, "traffic-script-prompt.png"))
    print("ok escaping: <script> shown as text")

    # The roll-back button rolls the canary back, with the reason typed into its prompt.
    assert api("/v1/flywheel/routes/agent")["stage"] == "canary", "the scenario left a canary"
    visit("/ui/rollouts", "rollouts-canary")
    driver.find_element(By.CSS_SELECTOR, 'section[data-route="agent"] button[data-action="rollback"]').click()
    try:
        alert = WebDriverWait(driver, 10).until(lambda d: d.switch_to.alert)
    except (TimeoutException, NoAlertPresentException):
        raise AssertionError("the roll-back button asked for no reason")
    alert.send_keys("rolled back from the dashboard")
    alert.accept()
    deadline = time.time() + 20
    while api("/v1/flywheel/routes/agent")["stage"] != "idle":
        assert time.time() < deadline, "the canary was not rolled back"
        time.sleep(0.25)
    last = api("/v1/flywheel/routes/agent")["events"][-1]
    assert last["action"] == "rollback" and "from the dashboard" in last["reason"], last
    WebDriverWait(driver, 20).until(lambda d: "idle" in d.find_element(By.CSS_SELECTOR, 'section[data-route="agent"] h2').text)
    driver.save_screenshot(os.path.join(shots, "rollouts-after-rollback.png"))
    logged = console_errors()
    assert not logged, f"console errors {logged}"
    print("ok rollback: the canary was rolled back from the dashboard")
finally:
    driver.quit()
