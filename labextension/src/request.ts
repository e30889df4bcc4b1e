import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Where every route of docs/api.md lives, below the server's base URL. */
export const API_PATH = 'fineinfer/api';

/**
 * Call the fineinfer REST API.
 *
 * @param endPoint path below `fineinfer/api/`, e.g. `status` or `jobs/job-1/stop`
 * @param init fetch options (method, body, ...)
 * @param settings the server settings (JupyterLab's own by default)
 * @returns the decoded JSON answer
 * @throws ServerConnection.NetworkError when the server can't be reached,
 *   ServerConnection.ResponseError (with the API's error message) otherwise
 */
export async function requestAPI<T>(
  endPoint = '',
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, API_PATH, endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }

  const text = await response.text();
  let data: any = text;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: e.g. jupyter_server's HTML 404 page while the server extension is missing
  }
  if (!response.ok) {
    const message = data?.error?.message ?? `HTTP ${response.status} ${response.statusText}`;
    throw new ServerConnection.ResponseError(response, message);
  }
  return data as T;
}
