'use strict';
// `meshca up` prints the dashboard's address with the login token in the fragment
// (https://…/#token=…): a fragment never reaches a server or a Referer header. Take it, clear it
// from the address bar and history, and log in with it — on load, or when it is pasted into a
// tab that already shows this page.
(() => {
  function fromFragment() {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (!m) return;
    history.replaceState(null, '', location.pathname);
    document.getElementById('token').value = decodeURIComponent(m[1]);
    document.getElementById('login-form').requestSubmit();
  }
  window.addEventListener('hashchange', fromFragment);
  fromFragment();
})();
