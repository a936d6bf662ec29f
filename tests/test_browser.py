"""The web page (GET /) in a real browser: Debian's Chromium driven by Playwright, against live gunicorn and Redis."""

import contextlib
import csv
import io
import json
import re
import subprocess

import pytest
import requests
from conftest import ADMIN, ADMIN_KEY, KEY, USER, LiveServer, basic_auth, iris_settings
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

from tests.support.servers import ARTIFACTS

# Debian's Chromium, never a downloaded one (no `playwright install`); flags for a container without a GPU or a
# sandbox, and nothing that phones home.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
CSV_TEXT = ",".join(FEATURES) + "\n" + "\n".join(",".join(map(str, row)) for row in ROWS) + "\n"
PREDICT = "/models/iris/versions/1/predict"
JSON = {"Content-Type": "application/json"}
# What Chromium logs for every fetch answered with a 4xx/5xx, or failed in the network, even one the page handles.
FAILED_LOAD = re.compile(r"Failed to load resource: (?:the server responded with a status of (\d+) \(.*\)|(net::\w+))")


def start_server(tmp_path_factory, iris_path, **env: str) -> LiveServer:
    """Gunicorn serving the demo model with the test users, as conftest's live_server does, for a whole module."""
    settings = {**iris_settings(iris_path), "WORKER_CLASS": "sync", **env}
    return LiveServer(tmp_path_factory.mktemp("page"), settings, workers=2).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory, iris_path, redis_server):
    """The page's server: 2 workers and a real Redis, shared by this module's tests."""
    if redis_server.proc.poll() is not None:  # an earlier test may have killed it, as redis_url allows
        redis_server.start()
    redis_server.client().flushall()
    live = start_server(tmp_path_factory, iris_path, REDIS_URL=redis_server.url)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, iris_path):
    """A server with tiny limits: at most 2 rows and 2000 bytes per request."""
    live = start_server(tmp_path_factory, iris_path, MAX_ROWS="2", MAX_BODY_BYTES="2000")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Console:
    """A page's console errors and uncaught errors. Chromium logs "Failed to load resource" for each non-2xx or
    failed fetch; that line is allowed only inside provoking(), for the status (or net:: error) the step provokes."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.allowed: int | str | None = None
        self.provoked: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _console(self, message) -> None:
        if message.type != "error":
            return
        failed = FAILED_LOAD.fullmatch(message.text)
        if failed and self.allowed is not None and (int(failed[1]) if failed[1] else failed[2]) == self.allowed:
            self.provoked.append(message.text)
        else:
            self.errors.append(f"console: {message.text} at {message.location}")

    @contextlib.contextmanager
    def provoking(self, cause: int | str, count: int = 1):
        """Allow (and expect) exactly `count` failed-load lines for this status or net:: error during the block."""
        self.allowed, self.provoked = cause, []
        yield
        # The line arrives with the response, before the page shows the error; wait briefly in case it lags.
        for _ in range(50):
            if len(self.provoked) >= count:
                break
            self.page.wait_for_timeout(20)
        self.allowed = None
        assert len(self.provoked) == count, self.provoked


@pytest.fixture
def open_page(browser):
    """Factory: open_page(server, user, key, width, height, clock, prompt) -> (page, console), the page loaded with its
    model; after the test, no page may have logged a console error or thrown."""
    opened = []

    def open_(live, user=ADMIN, key=ADMIN_KEY, width=1280, height=800, clock=False, prompt=True):
        # prompt=False sends the credentials on every request instead of answering the 401 challenge: Playwright
        # turns Chromium's HTTP cache off to answer challenges, which adds Cache-Control: no-cache to every fetch.
        login = (
            {"http_credentials": {"username": user, "password": key}}
            if prompt
            else {"extra_http_headers": basic_auth(user, key)}
        )
        context = browser.new_context(**login, viewport={"width": width, "height": height})
        page = context.new_page()
        console = Console(page)
        opened.append((context, console))
        if clock:
            page.clock.install()  # the status tab's 5 s polling, run on demand
        page.goto(live.url + "/")
        expect(page.get_by_label("petal_width")).to_have_value("0.2")  # the sample row: GET /models answered
        return page, console

    yield open_
    for context, _ in opened:
        context.close()
    assert [e for _, console in opened for e in console.errors] == []


def api_predict(live, rows: list, user=USER, key=KEY) -> dict:
    """POST /predict with rows and probabilities, as a client would."""
    body = {"features": rows, "probabilities": True}
    response = requests.post(live.url + "/predict", json=body, headers=basic_auth(user, key), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def api_error(live, path: str, user=USER, key=KEY, **kw) -> dict:
    """The error body the API answers for a request (a POST when data or json is given)."""
    method = "POST" if kw else "GET"
    headers = {**basic_auth(user, key), **kw.pop("headers", {})}
    response = requests.request(method, live.url + path, headers=headers, timeout=10, **kw)
    assert response.status_code >= 400, response.text
    return response.json()["error"]


def fill_row(page: Page, values: list) -> None:
    """Type a row into the Predict form, one labelled input per feature."""
    for name, value in zip(FEATURES, values):
        page.get_by_label(name, exact=True).fill(str(value))


def shown_probabilities(page: Page) -> dict[str, float]:
    """The probability bars' exact values (data-p), highest first."""
    rows = page.locator("#predict-probs .bar-row")
    return {row.get_attribute("data-class"): float(row.get_attribute("data-p")) for row in rows.all()}


def run_curl(command: str, cwd=None) -> dict:
    """Run a copied curl command with the placeholder replaced by the test user's credentials."""
    assert command.startswith("curl -u 'USER:KEY' ")
    command = command.replace("'USER:KEY'", f"'{USER}:{KEY}'", 1)
    done = subprocess.run(["bash", "-c", command + " -sS --fail-with-body"], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def screenshot(page: Page, name: str) -> None:
    """Save a full-page screenshot under test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=True)


def test_page_needs_basic_auth(server, browser):
    """GET / without credentials is the API's 401 JSON with a Basic challenge (the browser's login prompt), in a
    browser too; with credentials it is the page, under a CSP that allows only its own files."""
    bare = requests.get(server.url + "/", timeout=10)
    assert bare.status_code == 401
    assert bare.headers["WWW-Authenticate"].startswith("Basic")
    assert bare.json()["error"]["code"] == "unauthorized"
    # Without credentials Chromium gets the challenge and, with no one to answer its prompt, gives up on the page.
    context = browser.new_context()
    try:
        page = context.new_page()
        with page.expect_response(server.url + "/") as answer, pytest.raises(PlaywrightError, match="AUTH"):
            page.goto(server.url + "/")
        assert answer.value.status == 401 and answer.value.headers["www-authenticate"].startswith("Basic")
    finally:
        context.close()
    context = browser.new_context(http_credentials={"username": USER, "password": "not-the-key"})
    try:
        assert context.new_page().goto(server.url + "/").status == 401
    finally:
        context.close()
    html = requests.get(server.url + "/", headers=basic_auth(), timeout=10)
    assert html.status_code == 200 and "/static/page/sibyl.js" in html.text
    assert "script-src 'self'" in html.headers["Content-Security-Policy"]
    assert "<script>" not in html.text and "<style" not in html.text and "style=" not in html.text


def test_predict_shows_the_api_answer(server, open_page):
    """A row typed into the form gets the label and every class probability POST /predict gives, probabilities as
    bars highest first, with the server's latency, the cache outcome (a miss, then a hit) and the request id."""
    page, _ = open_page(server, prompt=False)  # the browser's cache on, as for people, so no Cache-Control is sent
    expect(page.locator("#model-info")).to_contain_text("onnx")
    expect(page.locator("#model-info")).to_contain_text("setosa, versicolor, virginica")
    row = [6.1, 2.8, 4.7, 1.2]  # no other test sends it: the first answer is a cache miss
    fill_row(page, row)
    page.get_by_role("button", name="Predict", exact=True).click()
    expect(page.locator("#predict-cache")).to_have_text("MISS (0 of 1 row from the cache)")
    api = api_predict(server, [row])
    expect(page.locator("#predict-label")).to_have_text(api["predictions"][0])
    shown = shown_probabilities(page)
    assert shown == api["probabilities"][0]
    assert list(shown.values()) == sorted(shown.values(), reverse=True)
    for bar in page.locator("#predict-probs .bar-row").all():
        p = float(bar.get_attribute("data-p"))
        expect(bar.locator(".bar-pct")).to_have_text(f"{p * 100:.1f}%" if p >= 0.001 else "<0.1%")
    expect(page.locator("#predict-latency")).to_have_text(re.compile(r"server \d+\.\d ms, round trip \d+\.\d ms"))
    request_id = page.locator("#predict-request-id").inner_text()
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    # Again: the page asks for no Cache-Control of its own (no-cache would make the server bypass its cache).
    page.get_by_role("button", name="Predict", exact=True).click()
    expect(page.locator("#predict-cache")).to_have_text("HIT (1 of 1 row from the cache)")
    expect(page.locator("#predict-request-id")).not_to_have_text(request_id)
    assert shown_probabilities(page) == api["probabilities"][0]
    screenshot(page, "desktop-predict.png")


def test_bad_value_is_shown_beside_its_field(server, open_page):
    """Text that is no number goes as a JSON string and the API's 400 message appears beside that feature's input
    (aria-invalid, aria-describedby, role=alert); a number token past float64 goes as typed, and its message shows;
    a good value clears both."""
    page, console = open_page(server)
    body = {"instances": [dict(zip(FEATURES, [5.1, 3.5, "abc", 0.2]))], "probabilities": True}
    message = api_error(server, PREDICT, json=body)["message"]
    field = page.get_by_label("petal_length", exact=True)
    with console.provoking(400):
        field.fill("abc")
        field.press("Enter")
        expect(page.locator("#f-2-error")).to_contain_text(message)
    assert "'petal_length'" in message
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_have_attribute("aria-describedby", "f-2-error")
    expect(page.locator("#f-2-error")).to_have_attribute("role", "alert")
    expect(page.locator("#predict-error")).to_be_empty()
    expect(page.locator("#predict-result")).to_be_hidden()

    raw = '{"instances": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1e400, "petal_width": 0.2}], '
    message = api_error(server, PREDICT, data=raw + '"probabilities": true}', headers=JSON)["message"]
    with console.provoking(400):
        field.fill("1e400")
        field.press("Enter")
        expect(page.locator("#panel-predict [role=alert]").filter(has_text=message)).to_have_count(1)

    field.fill("1.4")
    field.press("Enter")
    expect(page.locator("#predict-result")).to_be_visible()
    expect(page.locator("#panel-predict [role=alert]:not(:empty)")).to_have_count(0)
    expect(field).not_to_have_attribute("aria-invalid", "true")


def test_network_failure_is_explained(server, open_page):
    """A fetch that never reaches the server says so in the form, and the next one works."""
    page, console = open_page(server)
    page.context.set_offline(True)
    with console.provoking("net::ERR_INTERNET_DISCONNECTED"):
        page.get_by_role("button", name="Predict", exact=True).click()
        expect(page.locator("#predict-error")).to_contain_text("Could not reach the server")
    page.context.set_offline(False)
    page.get_by_role("button", name="Predict", exact=True).click()
    expect(page.locator("#predict-label")).to_have_text("setosa")
    expect(page.locator("#predict-error")).to_be_empty()


def batch_table(page: Page) -> list[list[str]]:
    """The batch answer's table body, cell texts per row."""
    return [row.locator("td").all_inner_texts() for row in page.locator("#batch-table tbody tr").all()]


def test_batch_round_trips_csv_and_downloads(server, open_page, tmp_path):
    """Three CSV rows, typed or picked as a file, are sent as text/csv and come back as a table with the API's
    predictions; "Download CSV" saves predictions.csv holding the inputs, predictions and exact probabilities."""
    page, _ = open_page(server)
    api = api_predict(server, ROWS)
    page.get_by_role("tab", name="Batch").click()
    page.get_by_label("Rows:").fill(CSV_TEXT)
    expect(page.get_by_label("With probabilities")).to_be_checked()
    with page.expect_request(lambda r: PREDICT in r.url) as sent:
        page.get_by_role("button", name="Score").click()
    assert sent.value.headers["content-type"] == "text/csv" and sent.value.post_data == CSV_TEXT
    assert sent.value.url.endswith("?probabilities=true")
    expect(page.locator("#batch-table tbody tr")).to_have_count(3)
    table = batch_table(page)
    assert [row[0] for row in table] == ["1", "2", "3"]
    assert [row[1:5] for row in table] == [[str(v) for v in row] for row in ROWS]
    assert [row[5] for row in table] == api["predictions"]
    expect(page.locator("#batch-meta")).to_contain_text("3 rows; server")
    screenshot(page, "desktop-batch.png")

    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    assert download.value.suggested_filename == "predictions.csv"
    lines = list(csv.reader(io.StringIO(download.value.path().read_text())))
    classes = list(api["probabilities"][0])
    assert lines[0] == ["row", *FEATURES, "prediction", *(f"p({c})" for c in classes)]
    assert [[float(v) for v in line[1:5]] for line in lines[1:]] == ROWS
    assert [line[5] for line in lines[1:]] == api["predictions"]
    assert [dict(zip(classes, map(float, line[6:]))) for line in lines[1:]] == api["probabilities"]

    # The same rows from a file: the File itself is the body, as is.
    page.get_by_label("Rows:").fill("")
    path = tmp_path / "rows.csv"
    path.write_text(CSV_TEXT)
    page.get_by_label("Or a file").set_input_files(path)
    expect(page.locator("#batch-source")).to_contain_text("rows.csv")
    page.get_by_label("With probabilities").uncheck()
    with page.expect_request(lambda r: PREDICT in r.url) as sent:
        page.get_by_role("button", name="Score").click()
    assert sent.value.post_data == CSV_TEXT and sent.value.url.endswith("?probabilities=false")
    expect(page.locator("#batch-table thead th")).to_have_count(6)  # no probability columns now
    assert [row[5] for row in batch_table(page)] == api["predictions"]

    # JSON rows go as {"instances": rows, "probabilities": ...}.
    page.get_by_label("Rows:").fill(json.dumps(ROWS))
    page.get_by_label("With probabilities").check()
    with page.expect_request(lambda r: PREDICT in r.url) as sent:
        page.get_by_role("button", name="Score").click()
    assert json.loads(sent.value.post_data) == {"instances": ROWS, "probabilities": True}
    expect(page.locator("#batch-table tbody tr td[data-p]")).to_have_count(9)
    assert [row[5] for row in batch_table(page)] == api["predictions"]


def test_too_large_batch_shows_the_413_message(small_server, open_page):
    """Past MAX_ROWS, and past MAX_BODY_BYTES, the page shows the API's 413 message, not a blank or a stack."""
    page, console = open_page(small_server, user=USER, key=KEY)
    page.get_by_role("tab", name="Batch").click()
    big = CSV_TEXT.splitlines()[0] + "\n" + "5.1,3.5,1.4,0.2\n" * 200
    for text, code in ((CSV_TEXT, "too_many_rows"), (big, "payload_too_large")):
        refused = api_error(small_server, PREDICT, data=text, headers={"Content-Type": "text/csv"})
        assert refused["code"] == code
        page.get_by_label("Rows:").fill(text)
        with console.provoking(413):
            page.get_by_role("button", name="Score").click()
            expect(page.locator("#batch-error")).to_contain_text(refused["message"])
        expect(page.locator("#batch-result")).to_be_hidden()


def status_of(page: Page, field: str):
    """A field of iris version 1's status card."""
    return page.locator('#status-cards [data-model="iris"][data-version="1"]').locator(f'[data-field="{field}"]')


def test_status_tab_shows_the_requests_made(server, open_page):
    """The Status tab shows each version's live figures, polls every 5 s while shown (computing requests per
    second between two polls), and stops polling on another tab or while the page is hidden."""
    before = requests.get(server.url + "/status", headers=basic_auth(ADMIN, ADMIN_KEY), timeout=10).json()
    counted = next(m["requests"] for m in before["models"] if (m["name"], m["version"]) == ("iris", "1"))
    for row in ROWS:
        api_predict(server, [row])
    page, _ = open_page(server, clock=True)
    polls = []
    page.on("request", lambda r: polls.append(r) if r.url.endswith("/status") else None)
    page.get_by_role("tab", name="Status").click()
    expect(status_of(page, "requests")).to_have_text(re.compile(r"\d+"))
    assert int(status_of(page, "requests").inner_text()) >= counted + len(ROWS)
    expect(page.locator("#status-updated")).to_have_text(
        re.compile(r"Figures since the server started; updated \d\d:\d\d:\d\d\.")
    )
    expect(status_of(page, "rate")).to_have_text("–")  # one poll: no rate yet
    for field in ("error-rate", "latency", "rows", "cache", "drift"):
        expect(status_of(page, field)).not_to_be_empty()
    screenshot(page, "desktop-status.png")

    api_predict(server, [ROWS[0]])
    page.clock.run_for(5000)
    expect(status_of(page, "rate")).to_have_text(re.compile(r"\d+\.\d\d"))
    assert len(polls) == 2

    page.get_by_role("tab", name="Predict").click()
    page.clock.run_for(20000)
    page.get_by_role("tab", name="Status").click()  # polls at once when shown again
    page.evaluate("""() => {
        Object.defineProperty(document, "visibilityState", {value: "hidden", configurable: true});
        document.dispatchEvent(new Event("visibilitychange"));
    }""")
    page.clock.run_for(20000)
    page.wait_for_timeout(200)  # a poll the clock would have started would be on the wire by now
    assert len(polls) == 3


def test_predict_only_user_sees_the_status_403_message(server, open_page):
    """A user without the admin or metrics role gets the API's 403 message on the Status tab, and no crash."""
    page, console = open_page(server, user=USER, key=KEY)
    message = api_error(server, "/status")["message"]
    with console.provoking(403):
        page.get_by_role("tab", name="Status").click()
        expect(page.locator("#status-error")).to_contain_text(message)
    expect(page.locator("#status-cards")).to_be_empty()


def test_keyboard_alone_predicts(server, open_page):
    """Tab reaches the pickers and the tabs, arrow keys (and Home/End) move between tabs, Tab enters the form,
    Enter submits: a prediction without a click."""
    page, _ = open_page(server)
    focused = []
    for _ in range(10):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
        if focused[-1] == "tab-predict":
            break
    assert focused[-3:] == ["model", "version", "tab-predict"]
    selected = page.locator('[role="tab"][aria-selected="true"]')
    steps = [("ArrowRight", "batch"), ("End", "status"), ("ArrowRight", "predict"), ("ArrowLeft", "status")]
    for key, tab in [*steps, ("Home", "predict")]:  # the arrows wrap around
        page.keyboard.press(key)
        expect(selected).to_have_id(f"tab-{tab}")
        expect(page.locator(f"#tab-{tab}")).to_be_focused()
        expect(page.locator(f"#panel-{tab}")).to_be_visible()
    for value in ROWS[1]:
        page.keyboard.press("Tab")
        page.keyboard.press("ControlOrMeta+a")
        page.keyboard.type(str(value))
    page.keyboard.press("Enter")
    expect(page.locator("#predict-label")).to_have_text(api_predict(server, [ROWS[1]])["predictions"][0])


def test_copy_as_curl_gives_the_same_predictions(server, open_page, tmp_path):
    """The curl command shown for the form and for the batch input, with USER:KEY filled in, answers what the page
    showed; Copy puts it on the clipboard and says so."""
    page, _ = open_page(server)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    fill_row(page, ROWS[1])
    page.get_by_role("button", name="Predict", exact=True).click()
    expect(page.locator("#predict-result")).to_be_visible()
    command = page.locator("#predict-curl").inner_text()
    assert f"'{server.url}{PREDICT}'" in command and "-H 'Content-Type: application/json'" in command
    answer = run_curl(command)
    assert answer["predictions"] == [page.locator("#predict-label").inner_text()]
    assert answer["probabilities"][0] == shown_probabilities(page)
    page.locator("#predict-copy").click()
    expect(page.locator("#panel-predict .copied")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == command

    api = api_predict(server, ROWS)
    page.get_by_role("tab", name="Batch").click()
    curl = page.locator("#batch-curl")  # rebuilt as the input changes (a picked file is read first)
    page.get_by_label("Rows:").fill(CSV_TEXT)
    expect(curl).to_contain_text("-H 'Content-Type: text/csv' --data-binary 'sepal_length,")
    assert curl.inner_text().endswith("?probabilities=true'")
    assert run_curl(curl.inner_text()) == api

    (tmp_path / "rows.csv").write_text(CSV_TEXT)
    page.get_by_label("Or a file").set_input_files(tmp_path / "rows.csv")
    expect(curl).to_contain_text("--data-binary @'rows.csv'")
    assert run_curl(curl.inner_text(), cwd=tmp_path)["predictions"] == api["predictions"]

    # A whole body keeps its own text, with the checkbox's "probabilities" added.
    page.get_by_label("Rows:").fill(json.dumps({"features": ROWS}))
    expect(curl).to_contain_text(f"-d '{json.dumps({'features': ROWS})[:-1]}, \"probabilities\": true}}'")
    assert run_curl(curl.inner_text())["probabilities"] == api["probabilities"]


def test_phone_width_is_readable(server, open_page):
    """At 390 px the page never scrolls sideways, with a prediction or a batch table on screen."""
    page, _ = open_page(server, width=390, height=844)
    page.get_by_role("button", name="Predict", exact=True).click()
    expect(page.locator("#predict-probs .bar-row")).to_have_count(3)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    screenshot(page, "phone-predict.png")
    page.get_by_role("tab", name="Batch").click()
    page.get_by_label("Rows:").fill(CSV_TEXT)
    page.get_by_role("button", name="Score").click()
    expect(page.locator("#batch-table tbody tr")).to_have_count(3)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    screenshot(page, "phone-batch.png")
