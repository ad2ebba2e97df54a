// The console's one script. Every page works without it; it adds the live preview of the
// issue form, "select all" on dead-letter lists, and a guard against double submits.
// Server data reaches the page only through textContent (never innerHTML).
"use strict";

(function () {
  // ------------------------------------------------------------------ double submits
  // The form's idempotency key already makes a second submit harmless; this only spares
  // the round trip. Disabled after the submit event so the clicked button's value is sent.
  document.addEventListener("submit", function (event) {
    const form = event.target;
    window.setTimeout(function () {
      form.querySelectorAll("button[type=submit]").forEach(function (button) {
        button.disabled = true;
      });
    }, 0);
  });

  // ------------------------------------------------------------------ select all
  document.querySelectorAll("input[data-select-all]").forEach(function (box) {
    box.addEventListener("change", function () {
      const scope = box.closest("form") || document;
      scope.querySelectorAll("input[name=" + box.dataset.selectAll + "]").forEach(function (each) {
        each.checked = box.checked;
      });
    });
  });

  // ------------------------------------------------------------------ money
  const NUMBER = /^\s*(\d{1,16})(?:\.(\d+))?\s*$/;

  // "12.5" in a currency of 2 decimals -> 1250; "" -> null; anything else throws.
  function minorUnits(text, exponent, field) {
    if (text === null || text.trim() === "") { return null; }
    const match = NUMBER.exec(text.replace(/,/g, ""));
    if (!match || (match[2] || "").length > exponent) {
      throw new FieldError(field, "not an amount with at most " + exponent + " decimals");
    }
    const fraction = (match[2] || "").padEnd(exponent, "0");
    return parseInt(match[1] + fraction, 10);
  }

  function wholeNumber(text, field) {
    if (text === null || text.trim() === "") { return null; }
    if (!/^\s*\d{1,9}\s*$/.test(text)) { throw new FieldError(field, "not a whole number"); }
    return parseInt(text, 10);
  }

  function FieldError(field, message) { this.field = field; this.message = message; }

  function shown(amount, currency, exponent) {
    if (amount === null || amount === undefined) { return ""; }
    const negative = amount < 0;
    const digits = String(Math.abs(amount)).padStart(exponent + 1, "0");
    const whole = digits.slice(0, digits.length - exponent).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    const fraction = exponent ? "." + digits.slice(digits.length - exponent) : "";
    return (negative ? "-" : "") + whole + fraction + " " + currency.toUpperCase();
  }

  // ------------------------------------------------------------------ issue form
  // The same data the server builds from the form (pages.issue_data): keep the two in step.
  function issueData(form, exponent) {
    const value = function (name) {
      const input = form.elements.namedItem(name);
      return input ? input.value : null;
    };
    const data = { reason: value("reason") || "other" };
    const memo = value("memo");
    if (memo) { data.memo = memo; }
    if (value("mode") === "amount") {
      data.amount = minorUnits(value("amount"), exponent, "amount");
      if (data.amount === null) { throw new FieldError("amount", "enter an amount"); }
    } else {
      const lines = [];
      form.querySelectorAll("[data-line]").forEach(function (row) {
        const index = row.dataset.line;
        const lineId = value("line-" + index + "-id");
        const quantity = wholeNumber(value("line-" + index + "-quantity"), "line-" + index + "-quantity");
        const amount = minorUnits(value("line-" + index + "-amount"), exponent, "line-" + index + "-amount");
        if (quantity !== null && amount !== null) {
          throw new FieldError("line-" + index + "-quantity", "give a quantity or an amount, not both");
        }
        if (quantity) {
          lines.push({ type: "invoice_line_item", invoice_line_id: lineId, quantity: quantity });
        } else if (amount) {
          lines.push({ type: "invoice_line_item", invoice_line_id: lineId, amount: amount });
        }
      });
      if (!lines.length) { throw new FieldError("lines", "choose a quantity or an amount on at least one line"); }
      data.lines = lines;
    }
    ["refund_amount", "credit_amount", "out_of_band_amount"].forEach(function (name) {
      const amount = minorUnits(value(name), exponent, name);
      if (amount !== null) { data[name] = amount; }
    });
    return data;
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    if (className) { node.className = className; }
    return node;
  }

  function row(cells, numeric) {
    const tr = document.createElement("tr");
    cells.forEach(function (cell, index) {
      tr.appendChild(element("td", cell, numeric && numeric[index] ? "num" : null));
    });
    return tr;
  }

  function renderPreview(box, result, currency, exponent) {
    const money = function (amount) { return shown(amount, currency, exponent); };
    box.replaceChildren();
    box.hidden = false;
    const maxima = element("div", null, "maxima");
    [["Most that can be credited", result.max_creditable],
     ["Most that can be refunded", result.max_refundable]].forEach(function (pair) {
      const block = element("div");
      block.appendChild(element("div", pair[0], "figure-label"));
      const figure = element("div", money(pair[1]), "figure");
      figure.dataset.maximum = pair[0].indexOf("refund") >= 0 ? "refundable" : "creditable";
      block.appendChild(figure);
      maxima.appendChild(block);
    });
    const note = result.credit_note;
    if (!note) {
      const rejected = element("div", null, "notice bad");
      rejected.dataset.preview = "rejected";
      const rejection = result.rejection || {};
      rejected.appendChild(element("strong", "Would be rejected: " + (rejection.code || "")));
      rejected.appendChild(element("p", rejection.message || ""));
      box.appendChild(rejected);
      box.appendChild(maxima);
      return false;
    }
    const heading = element("h2", "Preview: credit note " + note.number + " (nothing sent yet)");
    heading.dataset.preview = "ok";
    box.appendChild(heading);
    box.appendChild(maxima);
    const table = element("table");
    const head = document.createElement("tr");
    ["Line", "Description", "Quantity", "Net", "Tax", "Total"].forEach(function (name, index) {
      head.appendChild(element("th", name, index >= 2 ? "num" : null));
    });
    table.appendChild(head);
    (note.lines || []).forEach(function (line) {
      table.appendChild(row([line.invoice_line_id || "custom", line.description,
        line.quantity === null || line.quantity === undefined ? "" : line.quantity,
        money(line.net), money(line.tax), money(line.total)], [0, 0, 1, 1, 1, 1]));
    });
    const total = row(["", note.type + ", reason " + note.reason, "", money(note.subtotal),
      money(note.tax), money(note.total)], [0, 0, 1, 1, 1, 1]);
    total.className = "total";
    table.appendChild(total);
    box.appendChild(table);
    const split = element("dl", null, "facts");
    [["Before payment (reduces what is owed)", note.pre_payment_amount],
     ["Refunded", note.refund_amount], ["To the customer balance", note.credit_amount],
     ["Settled outside", note.out_of_band_amount]].forEach(function (pair) {
      split.appendChild(element("dt", pair[0]));
      split.appendChild(element("dd", money(pair[1])));
    });
    split.appendChild(element("dt", "Still owed on the invoice"));
    split.appendChild(element("dd", money(result.amount_remaining_before) + " \u2192 "
                                    + money(result.amount_remaining_after)));
    (note.refunds || []).forEach(function (refund) {
      split.appendChild(element("dt", "Refund on " + (refund.payment_id || "the payment at finalization")));
      split.appendChild(element("dd", money(refund.amount) + (refund.linked ? " (already made, linked)" : "")));
    });
    box.appendChild(split);
    return true;
  }

  function setupPreview(form) {
    const box = document.getElementById("preview");
    // A viewer's form has no Issue button: a stand-in keeps the code below simple.
    const issue = document.getElementById("issue-button") || { hidden: true };
    const error = document.getElementById("form-error");
    const currency = form.dataset.currency;
    const exponent = parseInt(form.dataset.exponent, 10);
    let timer = null;
    let sequence = 0;
    let previewed = null;

    function problem(message) {
      error.textContent = message || "";
      error.hidden = !message;
    }

    function modeChanged() {
      const mode = form.elements.namedItem("mode").value;
      form.querySelectorAll("[data-mode]").forEach(function (part) {
        part.hidden = part.dataset.mode !== mode;
      });
    }

    async function preview() {
      const mine = ++sequence;
      let data;
      try {
        data = issueData(form, exponent);
      } catch (failure) {
        if (!(failure instanceof FieldError)) { throw failure; }
        problem(failure.field + ": " + failure.message);
        issue.hidden = true;
        return;
      }
      problem("");
      previewed = null;
      const response = await fetch(form.dataset.previewUrl, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Accept": "application/json",
                   "X-CSRF-Token": form.elements.namedItem("csrf_token").value },
        body: JSON.stringify(data),
      });
      if (mine !== sequence) { return; }  // a newer preview is on its way
      const body = await response.json().catch(function () { return {}; });
      if (!response.ok) {
        const failure = body.error || {};
        problem((failure.code || response.status) + ": " + (failure.message || "preview failed")
                + (failure.field ? " (" + failure.field + ")" : ""));
        issue.hidden = true;
        return;
      }
      issue.hidden = !renderPreview(box, body, currency, exponent);
      previewed = JSON.stringify(data);
    }

    // What the form asks now, as text ("" when it does not parse): a change event that
    // changes nothing (a field losing focus) must not hide the Issue button under a click.
    function asked() {
      try { return JSON.stringify(issueData(form, exponent)); } catch (failure) { return ""; }
    }

    function soon() {
      const now = asked();
      if (now !== "" && now === previewed) { return; }
      issue.hidden = true;
      window.clearTimeout(timer);
      timer = window.setTimeout(function () { preview().catch(function () { problem("preview failed"); }); }, 300);
    }

    form.querySelectorAll("input[name=mode]").forEach(function (radio) {
      radio.addEventListener("change", modeChanged);
    });
    form.addEventListener("input", soon);
    form.addEventListener("change", soon);
    modeChanged();
    const noJsPreview = document.getElementById("preview-button");
    if (noJsPreview) { noJsPreview.hidden = true; }
  }

  const issueForm = document.getElementById("issue-form");
  if (issueForm) { setupPreview(issueForm); }
})();
