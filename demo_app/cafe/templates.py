"""The Cafe's pages (Jinja source kept in Python so the package needs no data files)."""
# ruff: noqa: E501  (HTML source; its lines are not Python's)

LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Cafe Sidecar</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #faf6f0; color: #2b2118; }
 header { background: #4b2e1e; color: #fff; padding: 0.8em 2em; }
 header a { color: #f5d9b8; margin-right: 1.2em; text-decoration: none; }
 main { padding: 1.5em 2em; max-width: 60em; }
 label { display: block; margin: 0.6em 0 0.2em; }
 input, textarea { font: inherit; padding: 0.3em; width: 22em; }
 button { font: inherit; margin-top: 1em; padding: 0.4em 1.2em; }
 table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }
 .errors { color: #a00; } .ok { color: #060; font-size: 1.2em; }
</style></head>
<body><header><strong>Cafe Sidecar</strong> &nbsp;
<a href="/">Reserve a table</a><a href="/orders">Reservations</a><a href="/contact">Contact</a></header>
<main>
{BODY}
</main></body></html>
"""

RESERVE = """<h1>Reserve a table</h1>
{% if errors %}<ul class="errors">{% for e in errors %}<li>{{ e }}</li>{% endfor %}</ul>{% endif %}
<form method="post" action="/reserve">
 <label for="name">Name</label><input id="name" name="name" required value="{{ form.get('name', '') }}">
 <label for="people">Party size</label>
 <input id="people" name="people" type="number" min="1" max="20" required value="{{ form.get('people', 2) }}">
 <label for="when">Date and time</label>
 <input id="when" name="when" type="datetime-local" required value="{{ form.get('when', '') }}">
 <label for="notes">Notes</label><textarea id="notes" name="notes" rows="3">{{ form.get('notes', '') }}</textarea>
 <br><button id="book" type="submit">Book</button>
</form>
"""

THANKS = """<h1>Thank you{% if name %}, {{ name }}{% endif %}!</h1>
<p class="ok" id="confirmation">Your reservation is booked. Reference <code id="ref">{{ ref }}</code>.</p>
<p><a href="/">Book another table</a> &middot; <a href="/orders">See reservations</a></p>
"""

ORDERS = """<h1>Reservations</h1>
<p>{{ total }} reservations in the book{% if total > rows|length %}, latest {{ rows|length }} shown{% endif %}.</p>
<table id="orders"><tr><th>#</th><th>Name</th><th>Party</th><th>When (UTC)</th><th>Notes</th><th>Ref</th></tr>
{% for r in rows %}<tr><td>{{ r.ordrid }}</td><td>{{ r.ordrname }}</td><td>{{ r.ordrppl }}</td>
<td>{{ r.ordrdttm.strftime('%Y-%m-%d %H:%M') }}</td><td>{{ r.ordrtxt }}</td><td><code>{{ r.ordrdgst }}</code></td></tr>
{% endfor %}</table>
"""

CONTACT = """<h1>Contact us</h1>
{% if sent %}<p class="ok" id="sent">Thanks, we got your message.</p>{% endif %}
{% if errors %}<ul class="errors">{% for e in errors %}<li>{{ e }}</li>{% endfor %}</ul>{% endif %}
<form method="post" action="/contact">
 <label for="cname">Name</label><input id="cname" name="name" required value="{{ form.get('name', '') }}">
 <label for="email">Email</label><input id="email" name="email" type="email" required
  value="{{ form.get('email', '') }}">
 <label for="body">Message</label><textarea id="body" name="body" rows="5" required>{{ form.get('body', '') }}</textarea>
 <br><button id="send" type="submit">Send</button>
</form>
"""

ERROR = """<h1>Sorry, something went wrong</h1>
<p class="errors" id="error">We could not reach our reservation book: {{ detail }}</p>
<p>Please try again in a moment.</p>
"""
